"""The whole DAG, for real: `airflow dags test triggers_pipeline` against the simulator and a real
SMTP server, on SQLite and PostgreSQL; then again, and nothing is sent twice."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

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
from tests.conftest import upgrade_schema

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated Airflow metadata database, shared by the tests of this module."""
    workdir = tmp_path_factory.mktemp("dag-run")
    environment = airflow_environment(
        workdir, "http://127.0.0.1:1", 1, workdir / "none.pem", SimulatorOptions(), "sqlite://"
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=environment, check=True, capture_output=True, timeout=300)
    return workdir


def run_dag(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [AIRFLOW, "dags", "test", "triggers_pipeline"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_the_dag_drains_matches_and_sends_once(workdir, db_url, tmp_path):
    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=3000,
        people=400,
        malformed_share=0.01,
        duplicate_share=0.01,
        start_time=time.time() - 3 * 3600,
        time_span=7200.0,
        seed=11,
    )
    engine = make_engine(db_url)
    upgrade_schema(engine, load_config().dimensions)  # what `db upgrade` does before the first run
    with Simulator(options) as simulator, LocalSmtpServer() as smtp:
        write_audience_csv(tmp_path / "audience.csv", 400)
        load_recipients(engine, tmp_path / "audience.csv")
        environment = airflow_environment(workdir, simulator.url, smtp.port, private_key, options, db_url)
        environment["TRIGGERS_TOKEN_CACHE"] = str(tmp_path / "token-cache")
        run_dag(environment)

        table = events_table()
        with engine.connect() as conn:
            statuses = dict(conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all())
            decided = dict(
                conn.execute(select(deliveries.c.status, func.count()).group_by(deliveries.c.status)).all()
            )
            sent_ids = {
                r[0]
                for r in conn.execute(select(deliveries.c.delivery_id).where(deliveries.c.status == "sent"))
            }
            counts = json.loads(conn.execute(select(pipeline_runs.c.counts)).scalar_one())
        received_ids = Counter(m.message_id.strip("<>").split("@")[0] for m in smtp.messages)

        # drained and processed: nothing left waiting, bad messages quarantined, unknown triggers ignored
        assert sum(statuses.values()) > 2900 and statuses.get("new", 0) == 0
        assert statuses["quarantined"] > 0 and statuses["ignored"] > 0 and statuses["matched"] > 0
        # every email sent is recorded, once, and nothing is left pending
        assert decided.get("pending", 0) == 0 and decided["sent"] > 10 and decided["suppressed"] > 0
        assert set(received_ids) == sent_ids and max(received_ids.values()) == 1
        # the run's counts are stored for the status view and returned as the report task's XCom
        assert counts["drained"] == 3000 and counts["sent"] == decided["sent"]

        simulator.publish(0)
        run_dag(environment)  # a second run: the journal is drained, the emails are sent
        with engine.connect() as conn:
            sent_again = conn.execute(select(func.count()).where(deliveries.c.status == "sent")).scalar()
        assert len(smtp.messages) == len(received_ids) == sent_again
