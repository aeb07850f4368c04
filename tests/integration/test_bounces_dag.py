"""The feedback DAG, for real: `airflow dags test triggers_feedback` reads a Dovecot mailbox
through `imap_default` into the database and files the report."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from include.config import load_config
from include.database.engine import make_engine
from include.sandbox.demo import AIRFLOW, airflow_environment
from include.sandbox.simulator.options import SimulatorOptions
from tests.conftest import upgrade_schema
from tests.integration.dovecot import Dovecot, dovecot_server, message_from_fixture  # noqa: F401
from tests.integration.test_delivery import seed
from tests.integration.test_pipeline_dag import workdir  # noqa: F401 (the module's Airflow database)

pytestmark = pytest.mark.slow


def test_the_dag_applies_the_mailbox_and_files_the_report(
    workdir: Path,  # noqa: F811 (fixture)
    db_url: str,
    dovecot: Dovecot,
    tmp_path: Path,
) -> None:
    config = load_config()
    engine = make_engine(db_url)
    upgrade_schema(engine, config.dimensions)
    (delivery_id,) = seed(engine, config, [{"email": "ann@example.org"}])
    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'sent', sent_at = :t"), {"t": time.time()})
    dovecot.append(
        message_from_fixture(
            "postfix_hard_bounce",
            delivery_id=delivery_id,
            recipient="ann@example.org",
            campaign_id="cart_abandonment",
            report_id="dag-1",
            bounce_domain="mail.shop.example",
        ),
        message_from_fixture(
            "customer_reply", delivery_id=delivery_id, recipient="ann@example.org", report_id="dag-2"
        ),
    )
    environment = airflow_environment(
        workdir, "http://127.0.0.1:1", 1, tmp_path / "none.pem", SimulatorOptions(), db_url
    )
    environment["AIRFLOW_CONN_IMAP_DEFAULT"] = json.dumps(dovecot.connection())
    environment["TRIGGERS_BOUNCE_ADDRESS"] = "bounces+{delivery_id}@mail.shop.example"
    done = subprocess.run(
        [AIRFLOW, "dags", "test", "triggers_feedback"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM deliveries")).scalar_one() == "bounced"
        assert conn.execute(text("SELECT reason FROM suppressions")).scalar_one() == "hard_bounce"
        assert conn.execute(text("SELECT outcome FROM mailbox_reports")).scalar_one() == "hard_bounce"
    engine.dispose()
    assert len(dovecot.messages("INBOX")) == 1 and len(dovecot.messages("Triggers/Processed")) == 1
