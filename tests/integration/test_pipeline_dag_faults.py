"""One failing stage does not stop the others: `airflow dags test triggers_pipeline` while the
journal answers 403 still matches and sends what is staged, records the run, and ends failed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from include.audience.load import load_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.database.schema import deliveries, events_table, pipeline_runs
from include.sandbox.demo import AIRFLOW, airflow_environment
from include.sandbox.keys import create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from tests.conftest import ROOT, upgrade_schema
from tests.integration.test_pipeline_dag import workdir  # noqa: F401 (the module's Airflow database)

pytestmark = pytest.mark.slow


def test_a_failed_drain_still_matches_delivers_and_reports_and_the_run_fails(
    workdir,  # noqa: F811 (fixture)
    db_url,
    tmp_path,
):
    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=1500,
        people=300,
        start_time=time.time() - 3 * 3600,
        time_span=7200.0,
        seed=5,
    )
    engine = make_engine(db_url)
    upgrade_schema(engine, load_config().dimensions)
    with Simulator(options) as simulator, LocalSmtpServer() as smtp:
        write_audience_csv(tmp_path / "audience.csv", 300)
        load_recipients(engine, tmp_path / "audience.csv")
        environment = airflow_environment(workdir, simulator.url, smtp.port, private_key, options, db_url)
        environment["TRIGGERS_TOKEN_CACHE"] = str(tmp_path / "token-cache")
        # an earlier drain staged the journal; then the journal refuses this consumer
        drained = subprocess.run(
            [sys.executable, "-m", "include.cli", "drain"],
            env=environment,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert drained.returncode == 0, drained.stderr[-3000:]
        simulator.faults.fail_next(403, 1000)

        run = subprocess.run(
            [AIRFLOW, "dags", "test", "triggers_pipeline"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = run.stdout + run.stderr
        with engine.connect() as conn:
            waiting = conn.execute(select(func.count()).where(events_table().c.status == "new")).scalar_one()
            sent = conn.execute(select(func.count()).where(deliveries.c.status == "sent")).scalar_one()
            counts = json.loads(conn.execute(select(pipeline_runs.c.counts)).scalar_one())
    engine.dispose()

    assert "403" in output  # the drain failed on the journal's refusal...
    assert waiting == 0 and sent > 10 and len(smtp.messages) == sent  # ...match and deliver still ran
    assert counts["sent"] == sent and counts["failed_stages"] == "drain"  # report recorded the run
    assert run.returncode != 0 and "DagRun failed" in output, output[-3000:]  # and the run ended failed
