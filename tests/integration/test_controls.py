"""Control over what goes out (SPEC section 9) on SQLite and PostgreSQL, against the local SMTP
server: campaign on/off and removed, max_age, send windows, preview, send-test, dry run."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from include import cli
from include.config import DEFAULT_TEMPLATES_DIR, TriggersConfig
from include.delivery.controls import cancel_pending, waiting_by_campaign
from include.delivery.render import encode_unstructured
from include.errors import ConfigError, PreviewError, SmtpUnavailableError
from include.matching.decisions import delivery_ids
from include.previews.dry_run import dry_run
from include.previews.preview import preview_message
from include.previews.seeds import send_seed_copies
from include.previews.send_test import mark_proof, proof_message, send_proof
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import deliver, rows, seed, smtp_settings

EVENT_TIME = 1767225201.0  # the seeded events' time: 2026-01-01 00:53:21 UTC


def with_campaign(
    config: TriggersConfig, campaign_id: str = "cart_abandonment", **changes: Any
) -> TriggersConfig:
    campaigns = [c.model_copy(update=changes) if c.id == campaign_id else c for c in config.campaigns]
    return config.model_copy(update={"campaigns": campaigns})


def statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    return {d: (r.status, r.reason) for d, r in rows(engine).items()}


def test_a_switched_off_campaign_waits_and_a_removed_one_waits_until_cancelled(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    cart = seed(engine, config, [{}, {}])
    with engine.begin() as conn:  # one is a retry due now: the run must not wait for it either
        conn.execute(
            text("UPDATE deliveries SET attempts = 1, claimed_at = :t WHERE delivery_id = :d"),
            {"t": EVENT_TIME - 3600, "d": cart[0]},
        )
    off = with_campaign(config, enabled=False)
    started = time.monotonic()
    counts = deliver(engine, off, server, now=EVENT_TIME + 60, wait_for_retries=30.0)
    assert time.monotonic() - started < 10, "the run waited for a switched-off campaign's retry"
    assert counts.get("sent", 0) == 0 and counts["waiting_disabled"] == 2
    assert statuses(engine) == {d: ("pending", None) for d in cart} and not server.messages
    with pytest.raises(ConfigError, match="enabled: false"):
        cancel_pending(engine, config, "cart_abandonment")  # an enabled campaign is refused
    # removed from the configuration: still waiting, reported, until cancelled explicitly
    removed = config.model_copy(
        update={"campaigns": [c for c in config.campaigns if c.id != "cart_abandonment"]}
    )
    counts = deliver(engine, removed, server, now=EVENT_TIME + 60)
    assert counts["waiting_removed_campaign"] == 2 and statuses(engine)[cart[0]] == ("pending", None)
    with engine.connect() as conn:
        assert waiting_by_campaign(conn, removed)["cart_abandonment"]["state"] == "removed"
    # switched back on: they go
    assert deliver(engine, config, server, now=EVENT_TIME + 60)["sent"] == 2
    more = seed_more(engine, config, 2)
    assert cancel_pending(engine, removed, "cart_abandonment") == 2
    with pytest.raises(ConfigError, match="campaigns list"):  # a typo is named, not "0 cancelled"
        cancel_pending(engine, removed, "cart_abandonmnet")
    assert {statuses(engine)[d] for d in more} == {("suppressed", "cancelled")}


def seed_more(engine: Engine, config: TriggersConfig, number: int) -> list[str]:
    """Two more pending deliveries (copies of the first with new ids)."""
    ids = [f"extra{i}" for i in range(number)]
    with engine.begin() as conn:
        for delivery_id in ids:
            conn.execute(
                text(
                    "INSERT INTO deliveries (delivery_id, campaign_id, recipient_id, email, event_id, event_time, "
                    "decided_at, status, attempts) SELECT :new, campaign_id, recipient_id, email, event_id, "
                    "event_time, decided_at, 'pending', 0 FROM deliveries WHERE delivery_id = 'd00000'"
                ),
                {"new": delivery_id},
            )
    return ids


def test_max_age_suppresses_stale_emails_as_expired_at_send_time(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}])
    six_hours = with_campaign(config, max_age=6 * 3600.0)
    counts = deliver(engine, six_hours, server, now=EVENT_TIME + 6 * 3600 + 5)
    assert counts["suppressed_expired"] == 1 and not server.messages
    assert statuses(engine)[ids[0]] == ("suppressed", "expired")
    fresh = seed_more(engine, config, 1)  # the same event: with a fresh clock it still goes
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE deliveries SET status = 'pending', reason = NULL WHERE delivery_id = :d"),
            {"d": fresh[0]},
        )
    assert deliver(engine, six_hours, server, now=EVENT_TIME + 3600)["sent"] == 1


def test_a_send_window_holds_emails_in_the_recipients_zone_until_it_opens(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(
        engine, config, [{"recipient_id": "tokyo"}, {"recipient_id": "paris"}, {"recipient_id": "default"}]
    )
    with engine.begin() as conn:
        conn.execute(text("UPDATE recipients SET timezone = 'Asia/Tokyo' WHERE recipient_id = 'tokyo'"))
        conn.execute(text("UPDATE recipients SET timezone = 'Europe/Paris' WHERE recipient_id = 'paris'"))
    windowed = with_campaign(config, send_window="08:00-21:00")
    windowed = windowed.model_copy(
        update={"limits": windowed.limits.model_copy(update={"default_timezone": "America/New_York"})}
    )
    # 2026-01-01 07:00 UTC: 16:00 in Tokyo (open), 08:00 in Paris (open), 02:00 in New York (closed)
    now = datetime(2026, 1, 1, 7, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    started = time.monotonic()
    counts = deliver(engine, windowed, server, now=now)
    assert time.monotonic() - started < 10, "the run waited for the window instead of ending"
    assert counts["sent"] == 2 and counts["held_send_window"] == 1
    held = rows(engine)[ids[2]]
    opening = datetime(2026, 1, 1, 8, 0, tzinfo=ZoneInfo("America/New_York")).timestamp()
    assert held.status == "pending" and held.not_before == opening
    assert deliver(engine, windowed, server, now=opening - 60).get("sent", 0) == 0  # not due yet
    assert deliver(engine, windowed, server, now=opening + 1)["sent"] == 1
    assert rows(engine)[ids[2]].status == "sent"


def real_decision(engine: Engine, delivery_id: str) -> str:
    """Give a seeded row the id matching would have given it (campaign, recipient, event)."""
    with engine.begin() as conn:
        row = conn.execute(
            text("SELECT campaign_id, recipient_id, event_id FROM deliveries WHERE delivery_id = :d"),
            {"d": delivery_id},
        ).one()
        new_id = delivery_ids(pd.Series([row[0]]), pd.Series([row[1]]), pd.Series([row[2]]))[0]
        conn.execute(
            text("UPDATE deliveries SET delivery_id = :n WHERE delivery_id = :d"),
            {"n": new_id, "d": delivery_id},
        )
    return new_id


def without_date(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date: "))


# an unsubscribe token, <delivery>.<issued>.<signature>, in the raw message: quoted-printable
# may break its lines (``=`` CRLF) anywhere; the two messages break them at the same places
_SOFT = rb"(?:=\r\n)?"
TOKEN = re.compile(
    rb"(?:[A-Za-z0-9_-]"
    + _SOFT
    + rb"){8,}\."
    + _SOFT
    + rb"(?:\d"
    + _SOFT
    + rb"){9,12}\."
    + _SOFT
    + rb"(?:[A-Za-z0-9_-]"
    + _SOFT
    + rb"){20,}"
)


def without_token(data: bytes) -> bytes:
    """The raw message but its Date line and its unsubscribe tokens' characters: a token carries
    the second it was issued at."""
    return TOKEN.sub(b"<token>", without_date(data))


@pytest.mark.parametrize("locale", [None, "fr_FR"])
def test_the_preview_is_byte_for_byte_what_delivery_sends(
    engine: Engine,
    config: TriggersConfig,
    server: LocalSmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    locale: str | None,
) -> None:
    monkeypatch.setenv("TRIGGERS_UNSUBSCRIBE_URL", "https://shop.example.com/unsubscribe/{token}")
    seeded = seed(
        engine, config, [{"first_name": "Zoé", "locale": locale, "products": ["SKU-1", "<b>SKU-2</b>"]}]
    )
    delivery_id = real_decision(engine, seeded[0])
    preview, source = preview_message(
        engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", recipient_id="r0", event_id="e0"
    )
    assert source == "staged event e0"
    time.sleep(1.1)  # a later second: the token issued then differs, nothing else may
    assert deliver(engine, config, server)["sent"] == 1
    sent = server.messages[0].data
    assert f"Message-ID: <{delivery_id}@example.com>".encode() in preview
    assert preview != sent and len(without_date(preview)) == len(without_date(sent))
    assert without_token(preview) == without_token(sent)
    assert without_token(sent).count(b"<token>") == 3  # List-Unsubscribe, text and HTML links
    # by address, and the latest decided event by default: the same message
    again, _ = preview_message(
        engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", email="PERSON0@example.org"
    )
    assert without_token(again) == without_token(preview)


def test_preview_errors_name_the_fix_and_a_sample_event_passes_the_campaigns_conditions(
    engine: Engine, config: TriggersConfig
) -> None:
    seed(engine, config, [{}])
    with pytest.raises(PreviewError, match="pass --campaign one of: cart_abandonment, browse_abandonment"):
        preview_message(engine, config, DEFAULT_TEMPLATES_DIR, "nope", recipient_id="r0")
    with pytest.raises(PreviewError, match="audience load"):
        preview_message(engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", recipient_id="ghost")
    with pytest.raises(PreviewError, match="--sample"):
        preview_message(
            engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", recipient_id="r0", event_id="x"
        )
    data, source = preview_message(
        engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", recipient_id="r0", sample=True
    )
    assert source == "a sample event" and b"X-Campaign-Id: cart_abandonment" in data
    broken = config.model_copy(
        update={"campaigns": [c.model_copy(update={"template": "broken"}) for c in config.campaigns]}
    )
    with pytest.raises(PreviewError, match="template"):
        preview_message(
            engine, broken, DEFAULT_TEMPLATES_DIR, "cart_abandonment", recipient_id="r0", sample=True
        )


def test_send_test_mails_a_marked_proof_that_is_never_recorded(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, [{}])
    before = statuses(engine)
    proof = proof_message(
        engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", "seed@example.net", recipient_id="r0"
    )
    assert send_proof(smtp_settings(server), proof).startswith("250")
    received = server.messages[0]
    assert received.rcpt_tos == ("seed@example.net",)
    assert received.message["Subject"].startswith("[TEST] Camille, your cart")
    assert received.message["X-Triggers-Proof"] == "yes" and "seed@example.net" in received.message["To"]
    assert statuses(engine) == before  # nothing recorded, nothing claimed
    with pytest.raises(PreviewError, match="one plain address"):
        proof_message(engine, config, DEFAULT_TEMPLATES_DIR, "cart_abandonment", "not an address")
    server.drop_next(1, at="DATA")  # the relay hangs up on the proof: a named error, no traceback
    with pytest.raises(SmtpUnavailableError, match="smtp_default"):
        send_proof(smtp_settings(server), proof)


def test_a_proof_of_a_long_non_ascii_subject_keeps_the_whole_subject() -> None:
    subject = "Zoé, votre panier vous attend toujours : 4 articles réservés pour vous"
    rendered = f"From: a@example.com\r\nSubject: {encode_unstructured(subject)}\r\nTo: b@example.com\r\n"
    assert "\r\n " in rendered  # folded: the proof header must not land inside the subject
    proof = message_from_bytes(mark_proof(rendered.encode() + b"\r\nbody"), policy=email_policy.default)
    assert proof["Subject"] == f"[TEST] {subject}" and proof["X-Triggers-Proof"] == "yes"


def test_a_dry_run_reports_per_campaign_and_writes_and_sends_nothing(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    seed(engine, config, [{}, {"opted_out": True}, {"email": "bad address"}])
    with engine.begin() as conn:  # one event still new: the dry run decides it too
        conn.execute(
            text(
                "UPDATE pipeline_events SET status = 'new', dim_evar01 = 'SHOP-r0', "
                "dim_pagename = 'checkout:cart' WHERE event_id = 'e0'"
            )
        )
        conn.execute(text("DELETE FROM deliveries WHERE event_id = 'e0'"))
    before_deliveries = statuses(engine)
    with engine.connect() as conn:
        before_events = conn.execute(
            text("SELECT event_id, status FROM pipeline_events ORDER BY event_id")
        ).all()
    caplog.set_level("INFO")
    report = dry_run(engine, config, DEFAULT_TEMPLATES_DIR, now=EVENT_TIME + 3600)
    cart = report["campaigns"]["cart_abandonment"]
    assert report["events_ready"] == 1
    assert cart["would_send"] == 1 and cart["suppressed"] == {"opted_out": 1, "invalid_email": 1}
    assert (
        "dry run sample of cart_abandonment" in caplog.text and "Subject: Camille, your cart" in caplog.text
    )
    assert statuses(engine) == before_deliveries and not server.messages
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT event_id, status FROM pipeline_events ORDER BY event_id")).all()
            == before_events
        )
    off = dry_run(engine, with_campaign(config, enabled=False), DEFAULT_TEMPLATES_DIR, now=EVENT_TIME + 3600)
    assert off["events_ready"] == 0 and off["campaigns"]["cart_abandonment"]["waiting"] == 2


def test_the_commands_preview_campaigns_and_dry_run(
    engine: Engine,
    db_url: str,
    config: TriggersConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(engine, config, [{}, {}])
    monkeypatch.setenv("TRIGGERS_DB_URL", db_url)
    out = tmp_path / "cart.eml"
    assert (
        cli.main(["preview", "--campaign", "cart_abandonment", "--recipient", "r0", "--out", str(out)]) == 0
    )
    message = message_from_bytes(out.read_bytes(), policy=email_policy.default)
    assert (
        message["Subject"] == "Camille, your cart is waiting"
        and message["To"] == "Camille <person0@example.org>"
    )
    assert "from staged event e0" in capsys.readouterr().err
    assert cli.main(["preview", "--campaign", "cart", "--email", "person1@example.org", "--sample"]) == 1
    assert "pass --campaign one of" in capsys.readouterr().err
    assert cli.main(["campaigns", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["cart_abandonment"] == {"state": "enabled", "pending": 2, "held_until_window": 0}
    assert cli.main(["status"]) == 0
    assert json.loads(capsys.readouterr().out)["campaigns"]["cart_abandonment"]["pending"] == 2
    assert cli.main(["campaigns", "cancel", "--campaign", "cart_abandonment"]) == 1
    assert "enabled: false" in capsys.readouterr().err
    assert cli.main(["dry-run", "--samples", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["campaigns"]["cart_abandonment"]["would_send"] == 2
    assert {s for s, _ in statuses(engine).values()} == {"pending"}


def test_seed_addresses_get_a_proof_of_each_campaigns_first_email_of_a_run(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, [{"first_name": "Ann"}, {"first_name": "Bob"}])
    seeded = with_campaign(config, seeds=["qa@example.net", "boss@example.net"])
    started = time.time()
    assert deliver(engine, seeded, server)["sent"] == 2
    counts = send_seed_copies(engine, seeded, DEFAULT_TEMPLATES_DIR, smtp_settings(server), started)
    assert counts == {"seed_copies": 2}
    copies = server.messages[2:]
    assert sorted(m.rcpt_tos[0] for m in copies) == ["boss@example.net", "qa@example.net"]
    first_sent = server.messages[0].message["Subject"]
    assert {m.message["Subject"] for m in copies} == {f"[TEST] {first_sent}"}
    assert len(rows(engine)) == 2  # the copies are not deliveries
    # a later run that sent nothing sends no copy
    assert send_seed_copies(engine, seeded, DEFAULT_TEMPLATES_DIR, smtp_settings(server), time.time()) == {}
