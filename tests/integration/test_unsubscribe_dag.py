"""The whole job, for real, on SQLite and PostgreSQL: ``airflow dags test triggers_pipeline``
drains the simulator and sends to the local SMTP server (run 1); a recipient POSTs the link of
its email's List-Unsubscribe header to the standalone endpoint; the audience is loaded again
(opted_out=false); the simulator publishes a new event of that person and run 2 sends them
nothing: ``deliveries`` and the status show ``unsubscribed``."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import text

from include.audience.load import load_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.operations.status import pipeline_status
from include.sandbox.demo import airflow_environment
from include.sandbox.keys import create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from include.suppressions.server import make_server
from tests.conftest import serving, upgrade_schema
from tests.integration.test_pipeline_dag import run_dag, workdir  # noqa: F401 - the module's Airflow database

pytestmark = pytest.mark.slow
BROWSE_TRIGGER = "5c2d8e71-4b0a-4f3e-9d6c-1a7b8e9f0c21"


def test_a_recipient_who_unsubscribes_gets_nothing_from_the_next_dag_run(
    workdir: Path,  # noqa: F811
    db_url: str,
    tmp_path: Path,
) -> None:
    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=1000,
        people=150,
        start_time=time.time() - 3 * 3600,
        time_span=3600.0,
        seed=7,
    )
    engine = make_engine(db_url)
    upgrade_schema(engine, load_config().dimensions)
    audience = write_audience_csv(tmp_path / "audience.csv", 150, opted_out_share=0.0)
    load_recipients(engine, audience)
    endpoint = make_server(engine, "http://127.0.0.1/u/{token}", "127.0.0.1", 0)
    url = f"http://127.0.0.1:{endpoint.server_port}/u/{{token}}"
    endpoint.url_template = url
    with Simulator(options) as simulator, LocalSmtpServer() as smtp, serving(endpoint):
        environment = airflow_environment(workdir, simulator.url, smtp.port, private_key, options, db_url)
        environment["TRIGGERS_TOKEN_CACHE"] = str(tmp_path / "token-cache")
        environment["TRIGGERS_UNSUBSCRIBE_URL"] = url
        environment.pop("TRIGGERS_UNSUBSCRIBE_SECRET", None)  # the one the database keeps
        run_dag(environment)
        assert smtp.messages, "run 1 sent nothing"
        message = smtp.messages[0].message
        address = smtp.messages[0].rcpt_tos[0]
        link = re.fullmatch(r"<(http://[^>]+)>", message["List-Unsubscribe"]).group(1)
        post = urllib.request.Request(
            link, b"List-Unsubscribe=One-Click", {"Content-Type": "application/x-www-form-urlencoded"}
        )
        with urllib.request.urlopen(post, timeout=10) as done:
            assert done.status == 200
        load_recipients(engine, audience)  # a reload says opted_out=false again
        with engine.connect() as conn:
            mc_id = conn.execute(
                text("SELECT mc_id FROM recipients WHERE lower(email) = :email"), {"email": address.lower()}
            ).scalar_one()
        sent_before = len(smtp.messages)
        simulator.publish_raw(
            [
                {
                    "event_id": "after-unsubscribe",
                    "triggerId": BROWSE_TRIGGER,
                    "timeGMT": int(time.time() - 2 * 3600),
                    "mcId": mc_id,
                    "enrichments": {"analyticsHitSummary": {"dimensions": {}}},
                }
            ]
        )
        run_dag(environment)
        assert not [m for m in smtp.messages[sent_before:] if address in m.rcpt_tos]
    with engine.connect() as conn:
        decision = conn.execute(
            text("SELECT status, reason, email FROM deliveries WHERE event_id = 'after-unsubscribe'")
        ).one()
    assert (decision.status, decision.reason, decision.email.lower()) == (
        "suppressed",
        "unsubscribed",
        address.lower(),
    )
    status = pipeline_status(engine, load_config().pipeline.consumer)
    assert status["suppressions"]["by_reason"] == {"unsubscribed": 1}
    assert status["emails"]["suppressed_by_reason"]["unsubscribed"] >= 1
    engine.dispose()
