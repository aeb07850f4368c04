"""End to end on SQLite and PostgreSQL: run 1 sends an email to the local SMTP server, the
recipient POSTs the link of its List-Unsubscribe header to the standalone endpoint, an audience
reload (opted_out=false) changes nothing, and run 2 (a new event of the same person) sends
nothing: ``deliveries`` and the status show the suppression's reason. The send-time check
suppresses a pending email whose address was suppressed after it was decided."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from include.audience.load import load_recipients
from include.config import DEFAULT_TEMPLATES_DIR
from include.delivery.options import DeliveryOptions
from include.delivery.run import deliver_pending
from include.matching.run import match_ready_events
from include.operations.status import pipeline_status
from include.sandbox.smtp_server import LocalSmtpServer
from include.suppressions.server import make_server
from include.suppressions.store import Suppression, add
from include.suppressions.unsubscribe import SECRET_ENV
from tests.conftest import serving
from tests.integration.test_delivery import smtp_settings
from tests.integration.test_matching_db import CONFIG, HOUR, T0, stage

DAY = 24 * HOUR
AUDIENCE = "recipient_id,email,first_name,shopper_id,mc_id,opted_out\nr1,Ann@Example.com,Ann,S1,MC1,false\n"


def decided(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id, status, reason FROM deliveries"))
        return {event: (status, reason) for event, status, reason in rows}


def run(engine: Engine, server: LocalSmtpServer, url: str, now: float) -> dict[str, int]:
    match_ready_events(engine, CONFIG, now=now)
    options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="e2e", unsubscribe_url=url)
    return deliver_pending(engine, CONFIG, smtp_settings(server), options)


def test_an_unsubscribed_person_gets_nothing_from_the_next_run(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)  # the secret the database keeps
    audience = tmp_path / "audience.csv"
    audience.write_text(AUDIENCE)
    stage(engine, {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0})
    load_recipients(engine, audience)
    template = "http://127.0.0.1:{port}/u/{{token}}"
    with LocalSmtpServer() as smtp, serving(make_server(engine, template, "127.0.0.1", 0)) as endpoint:
        url = template.format(port=endpoint.server_port)
        endpoint.url_template = url
        assert run(engine, smtp, url, T0 + HOUR)["sent"] == 1
        header = smtp.messages[0].message["List-Unsubscribe"]
        link = re.fullmatch(r"<(http://[^>]+)>", header).group(1)
        with urllib.request.urlopen(link, timeout=10) as page:  # what a mail scanner does
            assert page.status == 200
        assert pipeline_status(engine, "it")["suppressions"]["total"] == 0
        post = urllib.request.Request(
            link, b"List-Unsubscribe=One-Click", {"Content-Type": "application/x-www-form-urlencoded"}
        )
        with urllib.request.urlopen(post, timeout=10) as done:
            assert done.status == 200
        load_recipients(engine, audience)  # the audience says opted_out=false again
        stage(engine, {"id": "b2", "kind": "browse", "mc": "MC1", "t": T0 + 2 * DAY})
        second = run(engine, smtp, url, T0 + 2 * DAY + HOUR)
        assert second.get("sent", 0) == 0 and len(smtp.messages) == 1
    assert decided(engine) == {"b1": ("sent", None), "b2": ("suppressed", "unsubscribed")}
    status = pipeline_status(engine, "it")
    assert status["suppressions"] == {"total": 1, "by_reason": {"unsubscribed": 1}}
    assert status["emails"]["suppressed_by_reason"] == {"unsubscribed": 1}


def test_the_send_time_check_suppresses_an_address_suppressed_after_the_decision(
    engine: Engine, tmp_path: Path
) -> None:
    audience = tmp_path / "audience.csv"
    audience.write_text(AUDIENCE + "r2,bob@example.com,Bob,S2,MC2,false\n")
    stage(
        engine,
        {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0},
        {"id": "b2", "kind": "browse", "mc": "MC2", "t": T0},
    )
    load_recipients(engine, audience)
    assert match_ready_events(engine, CONFIG, now=T0 + HOUR)["pending"] == 2
    with engine.begin() as conn:  # after the decision, before the send
        add(conn, [Suppression("ANN@example.com", "hard_bounce", source="test")])
        add(conn, [Suppression("bob@example.com", "manual", campaign_id="cart_abandonment")])  # not this one
    with LocalSmtpServer() as smtp:
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t", now=time.time())
        counts = deliver_pending(engine, CONFIG, smtp_settings(smtp), options)
        assert [m.rcpt_tos for m in smtp.messages] == [("bob@example.com",)]
    assert counts["sent"] == 1 and counts["suppressed_hard_bounce"] == 1
    assert decided(engine) == {"b1": ("suppressed", "hard_bounce"), "b2": ("sent", None)}


def test_a_relay_off_this_machine_refuses_the_placeholder_url(engine: Engine, tmp_path: Path) -> None:
    from dataclasses import replace

    from include.errors import ConfigError

    with LocalSmtpServer() as smtp:
        remote = replace(smtp_settings(smtp), host="smtp.example.com")
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t")
        with pytest.raises(ConfigError, match="TRIGGERS_UNSUBSCRIBE_URL is not set"):
            deliver_pending(engine, CONFIG, remote, options)
