"""The DAG params through a real ``airflow dags test triggers_pipeline --conf``: ``max_events``
caps the drain, ``max_messages`` the sends, and ``dry_run`` writes and sends nothing."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from include.audience.load import load_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.database.schema import deliveries, events_table
from include.sandbox.demo import AIRFLOW, airflow_environment
from include.sandbox.keys import create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from tests.conftest import upgrade_schema
from tests.integration.test_pipeline_dag import workdir  # noqa: F401 - the module's Airflow database

pytestmark = pytest.mark.slow


def run_dag(environment: dict[str, str], conf: dict[str, object]) -> str:
    run = subprocess.run(
        [AIRFLOW, "dags", "test", "triggers_pipeline", "--conf", json.dumps(conf)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def snapshot(engine: Engine) -> tuple[dict[str, str], dict[str, str]]:
    with engine.connect() as conn:
        decided = dict(conn.execute(select(deliveries.c.delivery_id, deliveries.c.status)).all())
        events = dict(conn.execute(text("SELECT event_id, status FROM pipeline_events")).all())
    return decided, events


def test_caps_and_a_dry_run_from_the_conf(workdir: Path, db_url: str, tmp_path: Path) -> None:  # noqa: F811
    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=1500,
        people=300,
        start_time=time.time() - 3 * 3600,
        time_span=3600.0,
        seed=5,
    )
    engine = make_engine(db_url)
    config = load_config()
    upgrade_schema(engine, config.dimensions)
    with Simulator(options) as simulator, LocalSmtpServer() as smtp:
        write_audience_csv(tmp_path / "audience.csv", 300)
        load_recipients(engine, tmp_path / "audience.csv")
        environment = airflow_environment(workdir, simulator.url, smtp.port, private_key, options, db_url)
        environment["TRIGGERS_TOKEN_CACHE"] = str(tmp_path / "token-cache")

        run_dag(environment, {"max_events": 400, "max_messages": 5})
        with engine.connect() as conn:
            staged = conn.execute(select(func.count()).select_from(events_table())).scalar_one()
            sent = conn.execute(select(func.count()).where(deliveries.c.status == "sent")).scalar_one()
            pending = conn.execute(select(func.count()).where(deliveries.c.status == "pending")).scalar_one()
        fetch_size = config.pipeline.fetch_size
        assert 400 <= staged < 400 + fetch_size and staged < 1500  # the drain stopped at its cap's page
        assert sent == len(smtp.messages) == 5 and pending > 0  # the rest wait for the next run

        before = snapshot(engine)
        # at INFO, `dags test` echoes the task logs: the dry run's samples are in the match task's
        output = run_dag({**environment, "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}, {"dry_run": True})
        assert snapshot(engine) == before and len(smtp.messages) == 5  # nothing written, nothing sent
        assert "dry run sample of cart_abandonment" in output and "Subject:" in output
        report = match_report(workdir)
        assert report["dry_run"] is True
        would_send = sum(campaign["would_send"] for campaign in report["campaigns"].values())
        assert would_send == pending  # what the next real run would send


def match_report(airflow_dir: Path) -> dict[str, Any]:
    """The match task's XCom of the latest run, from the Airflow metadata database."""
    with sqlite3.connect(airflow_dir / "airflow" / "airflow.db") as conn:
        row = conn.execute(
            "SELECT value FROM xcom WHERE task_id = 'match' AND key = 'return_value' ORDER BY timestamp DESC LIMIT 1"
        ).fetchone()
    return json.loads(row[0])
