"""The audience_sync DAG for real: `airflow dags test audience_sync` against a MariaDB source
(the PostgreSQL source is covered by test_audience_source), with removals, the guard that
refuses them, and the run that forces them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from include.config import load_config
from include.database.engine import make_engine
from include.sandbox.demo import AIRFLOW, airflow_environment
from include.sandbox.simulator.options import SimulatorOptions
from tests.conftest import upgrade_schema
from tests.integration.test_audience_source import CONN_ID, QUERY, _mariadb, person

pytestmark = pytest.mark.slow


def run_sync(environment: dict[str, str], *conf: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AIRFLOW, "dags", "test", "audience_sync", *conf],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_dag_upserts_removes_and_refuses_too_many_removals_unless_forced(
    tmp_path: Path, monkeypatch
) -> None:
    environment = airflow_environment(
        tmp_path, "http://127.0.0.1:1", 1, tmp_path / "none.pem", SimulatorOptions(), "sqlite://"
    )
    migrate = subprocess.Popen([AIRFLOW, "db", "migrate"], env=environment, stdout=subprocess.DEVNULL)
    db_url = f"sqlite:///{tmp_path / 'triggers.db'}"
    engine = make_engine(db_url)
    upgrade_schema(engine, load_config().dimensions)
    for source in _mariadb(monkeypatch):
        source.write([person(n) for n in range(1, 11)])
        environment.update(
            {
                "TRIGGERS_DB_URL": db_url,
                "TRIGGERS_AUDIENCE_CONN_ID": CONN_ID,
                "TRIGGERS_AUDIENCE_SQL": QUERY,
                f"AIRFLOW_CONN_{CONN_ID.upper()}": os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"],
            }
        )
        assert migrate.wait(timeout=300) == 0

        def ids() -> set[str]:
            with engine.connect() as conn:
                return set(conn.execute(text("SELECT recipient_id FROM recipients")).scalars())

        first = run_sync(environment)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert ids() == {f"r{n}" for n in range(1, 11)}

        source.write([person(n) for n in range(1, 6)])  # half the audience gone: refused, nothing changes
        refused = run_sync(environment)
        assert "would remove 5 of 10 recipients" in refused.stdout + refused.stderr
        assert ids() == {f"r{n}" for n in range(1, 11)}

        forced = run_sync(environment, "--conf", json.dumps({"force_removals": True}))
        assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
        assert ids() == {f"r{n}" for n in range(1, 6)}
