"""From a bounce to a suppressed address, for real, on SQLite and PostgreSQL: run 1 sends through
the local SMTP server with VERP (one address refused 550 5.1.1 at RCPT), a Postfix bounce and a
complaint for two others land in Dovecot, ``bounces read`` runs as a command, and run 2, with
new events for everyone, sends only to the address that neither bounced nor complained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, text

from include.config import DEFAULT_TEMPLATES_DIR
from include.delivery.options import DeliveryOptions
from include.delivery.run import deliver_pending
from include.matching.run import match_ready_events
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.dovecot import Dovecot, dovecot_server, message_from_fixture  # noqa: F401
from tests.integration.test_delivery import ROOT, smtp_settings
from tests.integration.test_matching_db import CONFIG, CONFIG_TEXT, HOUR, T0, audience, stage

BOUNCE_ADDRESS = "bounces+{delivery_id}@mail.shop.example"
PEOPLE = [  # recipient_id, email, shopper_id, mc_id, opted_out
    ("r-ann", "ann@example.org", "S-ANN", "MC-ANN", False),  # a Postfix bounce: 5.1.1
    ("r-bob", "bob@example.org", "S-BOB", "MC-BOB", False),  # complains
    ("r-cid", "cid@example.org", "S-CID", "MC-CID", False),  # reads her email
    ("r-dan", "dan@example.org", "S-DAN", "MC-DAN", False),  # refused 550 5.1.1 at RCPT
]
DAY = 24 * HOUR


def run(engine: Engine, smtp: LocalSmtpServer, at: float, tag: str) -> dict[str, int]:
    """New browse events for everyone at ``at``; match, then deliver."""
    stage(engine, *({"id": f"{tag}-{p[0]}", "kind": "browse", "mc": p[3], "t": at} for p in PEOPLE))
    match_ready_events(engine, CONFIG, now=at + HOUR)
    options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id=tag, retry_delay=0.05)
    return deliver_pending(engine, CONFIG, smtp_settings(smtp), options)


def deliveries(engine: Engine) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(event id, address) -> (status, reason): what the deliveries table shows."""
    with engine.connect() as conn:
        found = conn.execute(text("SELECT event_id, email, status, reason FROM deliveries"))
        return {(event, email): (status, reason) for event, email, status, reason in found}


def delivery_of(engine: Engine, event_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT delivery_id FROM deliveries WHERE event_id = :e"), {"e": event_id}
        ).scalar_one()


def test_a_bounce_and_a_complaint_stop_the_next_run_for_those_addresses(
    db_url: str, engine: Engine, dovecot: Dovecot, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TRIGGERS_BOUNCE_ADDRESS", BOUNCE_ADDRESS)
    audience(engine, PEOPLE)
    with LocalSmtpServer() as smtp:
        smtp.reject("dan@example.org")
        first = run(engine, smtp, T0, "one")
        assert (first["sent"], first["failed"], first["hard_bounced"]) == (3, 1, 1)
        assert {m.mail_from.split("@")[0] for m in smtp.messages} == {
            "bounces+" + delivery_of(engine, f"one-{p[0]}") for p in PEOPLE[:3]
        }

        ann, bob = delivery_of(engine, "one-r-ann"), delivery_of(engine, "one-r-bob")
        common = {"campaign_id": "browse_abandonment", "bounce_domain": "mail.shop.example"}
        dovecot.append(
            message_from_fixture(
                "postfix_hard_bounce", delivery_id=ann, recipient="ann@example.org", report_id="b1", **common
            ),
            message_from_fixture(
                "yahoo_complaint", delivery_id=bob, recipient="bob@example.org", report_id="c1", **common
            ),
        )
        read = read_command(db_url, dovecot, tmp_path)
        assert read == {"read": 2, "hard_bounce": 1, "complaint": 1, "processed": 2}

        sent_before = len(smtp.messages)
        second = run(engine, smtp, T0 + 2 * DAY, "two")
        assert second.get("sent") == 1 and len(smtp.messages) == sent_before + 1
        assert [m.message["To"] for m in smtp.messages[sent_before:]] == ["cid@example.org"]

    shown = deliveries(engine)
    assert shown[("one-r-ann", "ann@example.org")][0] == "bounced"
    assert "5.1.1" in shown[("one-r-ann", "ann@example.org")][1]
    assert shown[("one-r-bob", "bob@example.org")] == ("sent", "complaint")
    assert shown[("one-r-dan", "dan@example.org")] == ("failed", "smtp_rejected")
    assert shown[("two-r-ann", "ann@example.org")] == ("suppressed", "hard_bounce")
    assert shown[("two-r-bob", "bob@example.org")] == ("suppressed", "complaint")
    assert shown[("two-r-dan", "dan@example.org")] == ("suppressed", "hard_bounce")
    assert shown[("two-r-cid", "cid@example.org")][0] == "sent"
    assert read_command(db_url, dovecot, tmp_path) == {}  # nothing new: the reports were filed


def read_command(db_url: str, server: Dovecot, tmp_path: Path) -> dict[str, int]:
    """``python -m include.cli bounces read``, as an operator runs it."""
    (tmp_path / "triggers.yaml").write_text(CONFIG_TEXT)
    environment = {
        **os.environ,
        "TRIGGERS_DB_URL": db_url,
        "TRIGGERS_CONFIG": str(tmp_path / "triggers.yaml"),
        "AIRFLOW_CONN_IMAP_DEFAULT": json.dumps(server.connection()),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
    }
    command = [sys.executable, "-m", "include.cli", "bounces", "read"]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
