"""A real run's metrics reach a real StatsD listener: `airflow dags test triggers_pipeline`
against the simulator and the local SMTP server, Airflow's `[metrics]` pointed at a UDP socket of
this test; the counters carry the run's recorded counts."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from sqlalchemy import select

from include.audience.load import load_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.database.schema import pipeline_runs
from include.sandbox.demo import AIRFLOW, airflow_environment
from include.sandbox.keys import create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from tests.conftest import new_database_url, upgrade_schema
from tests.integration.test_alerts_airflow import StatsdListener
from tests.integration.test_pipeline_dag import workdir  # noqa: F401 (the module's Airflow database)

pytestmark = pytest.mark.slow


def _received(lines: list[str], prefix: str) -> dict[str, tuple[float, str]]:
    """name -> (value, kind) of the StatsD lines under ``prefix``; each name sent once."""
    received: dict[str, tuple[float, str]] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name.startswith(prefix):
            value, kind = rest.split("|")[:2]
            assert name not in received, f"{name} sent twice"
            received[name] = (float(value), kind)
    return received


def _statsd_settings(tmp_path, port: int) -> dict[str, str]:
    return {
        "TRIGGERS_TOKEN_CACHE": str(tmp_path / "token-cache"),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "shop",
    }


def test_the_run_counts_reach_statsd(workdir, tmp_path):  # noqa: F811 (fixture)
    db_url = next(new_database_url("sqlite", tmp_path))
    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=1500,
        people=300,
        malformed_share=0.01,
        start_time=time.time() - 3 * 3600,
        time_span=7200.0,
        seed=7,
    )
    engine = make_engine(db_url)
    upgrade_schema(engine, load_config().dimensions)
    with Simulator(options) as simulator, LocalSmtpServer() as smtp, StatsdListener() as statsd:
        write_audience_csv(tmp_path / "audience.csv", 300)
        load_recipients(engine, tmp_path / "audience.csv")
        environment = airflow_environment(workdir, simulator.url, smtp.port, private_key, options, db_url)
        environment.update(_statsd_settings(tmp_path, statsd.port))
        run = subprocess.run(
            [AIRFLOW, "dags", "test", "triggers_pipeline"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        time.sleep(0.5)  # the last datagrams
        with engine.connect() as conn:
            counts = json.loads(conn.execute(select(pipeline_runs.c.counts)).scalar_one())
    engine.dispose()

    received = _received(statsd.lines, "shop.triggers.")
    assert counts["drained"] == 1500 and counts["sent"] > 10
    assert received["shop.triggers.events.received"] == (1500, "c")
    assert received["shop.triggers.events.quarantined"] == (counts["quarantined"], "c")
    assert received["shop.triggers.events.matched"] == (counts["matched"], "c")
    assert received["shop.triggers.emails.sent"] == (counts["sent"], "c") == (len(smtp.messages), "c")
    # a reason's punctuation (cancelled_by:purchase) becomes "_" in a metric name
    suppressed = {
        re.sub(r"[^A-Za-z0-9_]", "_", k.removeprefix("suppressed_")): v
        for k, v in counts.items()
        if k.startswith("suppressed_")
    }
    assert suppressed and all(
        received[f"shop.triggers.emails.suppressed.{reason}"] == (n, "c") for reason, n in suppressed.items()
    )
    assert received["shop.triggers.send_rate"][1] == "g" and received["shop.triggers.send_rate"][0] > 0
    assert received["shop.triggers.lag_seconds"] == (counts["lag_seconds"], "g")
