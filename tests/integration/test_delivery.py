"""Delivery against a real SMTP server (aiosmtpd) on SQLite and PostgreSQL (SPEC sections 6, 7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from include.config import DEFAULT_TEMPLATES_DIR, TriggersConfig
from include.database.schema import deliveries, recipients
from include.database.sql import bulk_write
from include.delivery.hook import PipeliningSmtpHook
from include.delivery.options import DeliveryOptions
from include.delivery.run import deliver_pending
from include.delivery.smtp import SmtpSettings
from include.errors import SmtpUnavailableError
from include.sandbox.smtp_server import LocalSmtpServer
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]
CART_TRIGGER = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"


def settings_of(connection: Any) -> SmtpSettings:
    """What a sending session gets from ``connection``, read by the hook as it reads smtp_default."""
    return PipeliningSmtpHook.for_connection(connection).session_settings()


def smtp_settings(server: LocalSmtpServer, **extra: Any) -> SmtpSettings:
    connection = SimpleNamespace(
        host="127.0.0.1",
        port=server.port,
        login=None,
        password=None,
        extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 6, **extra},
    )
    return settings_of(connection)


def seed(
    engine: Engine, config: TriggersConfig, people: list[dict[str, Any]], campaign: str = "cart_abandonment"
) -> list[str]:
    """One recipient, one staged event and one pending delivery per person; returns the delivery ids."""
    table = upgrade_schema(engine, config.dimensions)
    now = time.time()
    ids = []
    with engine.begin() as conn:
        people_rows, event_rows, delivery_rows = [], [], []
        for i, person in enumerate(people):
            rid = person.get("recipient_id", f"r{i}")
            email = person.get("email", f"person{i}@example.org")
            people_rows.append(
                (
                    rid,
                    email,
                    person.get("first_name", "Camille"),
                    person.get("last_name"),
                    person.get("locale"),
                    f"SHOP-{rid}",
                    bool(person.get("opted_out", False)),
                )
            )
            payload = {
                "triggerId": CART_TRIGGER,
                "timeGMT": 1767225201,
                "mcId": f"mc-{rid}",
                "enrichments": {
                    "analyticsHitSummary": {
                        "dimensions": {
                            " eVar01": {
                                "type": "string",
                                "data": [f"SHOP-{rid}"],
                                "name": "eVar01",
                                "source": "session summary",
                            },
                            "products": {
                                "type": "string",
                                "data": person.get("products", ["SKU-1042"]),
                                "name": "products",
                                "source": "session summary",
                            },
                            "pageName": {
                                "type": "string",
                                "data": ["checkout:cart"],
                                "name": "pageName",
                                "source": "session summary",
                            },
                        }
                    }
                },
            }
            event_rows.append(
                (f"e{i}", str(i), "test", CART_TRIGGER, 1767225201.0, now, "matched", json.dumps(payload))
            )
            ids.append(f"d{i:05d}")
            delivery_rows.append((ids[-1], campaign, rid, email, f"e{i}", 1767225201.0, now, "pending", 0))
        bulk_write(
            conn,
            recipients,
            ["recipient_id", "email", "first_name", "last_name", "locale", "shopper_id", "opted_out"],
            people_rows,
        )
        bulk_write(
            conn,
            table,
            [
                "event_id",
                "position",
                "consumer",
                "trigger_id",
                "time_gmt",
                "received_at",
                "status",
                "payload",
            ],
            event_rows,
        )
        bulk_write(
            conn,
            deliveries,
            [
                "delivery_id",
                "campaign_id",
                "recipient_id",
                "email",
                "event_id",
                "event_time",
                "decided_at",
                "status",
                "attempts",
            ],
            delivery_rows,
        )
    return ids


def rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.delivery_id: r for r in conn.execute(select(deliveries))}


def received_ids(server: LocalSmtpServer) -> Counter[str]:
    return Counter((mid or "").strip("<>").split("@")[0] for mid in server.message_ids())


def deliver(
    engine: Engine,
    config: TriggersConfig,
    server: LocalSmtpServer,
    smtp_timeout: float = 30.0,
    **options: Any,
) -> dict[str, int]:
    """A run with ``options``; a short lease needs a short ``smtp_timeout`` (DeliveryOptions.check_lease)."""
    options = {"templates_dir": DEFAULT_TEMPLATES_DIR, "worker_id": "test", "retry_delay": 0.05, **options}
    smtp = smtp_settings(server, timeout=smtp_timeout)
    return deliver_pending(engine, config, smtp, DeliveryOptions(**options))


def test_each_pending_delivery_is_sent_once_with_its_headers_and_recorded(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{"products": ["SKU-1", "<img src=x onerror=alert(1)>"]} for _ in range(30)])
    counts = deliver(engine, config, server, connections=3, batch_size=7)
    assert counts["sent"] == 30
    assert received_ids(server) == Counter({i: 1 for i in ids})
    state = rows(engine)
    assert {r.status for r in state.values()} == {"sent"}
    assert all(r.smtp_reply.startswith("250 ") and r.sent_at and r.attempts == 1 for r in state.values())
    message = server.messages[0].message
    assert message.get_content_type() == "multipart/alternative"
    assert (
        message["List-Unsubscribe"].startswith("<https://")
        and message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    )
    assert message["X-Campaign-Id"] == "cart_abandonment"
    html = message.get_body(("html",)).get_content()
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img src=x" not in html
    assert all(
        m.rcpt_tos == (state[received].email,)
        for m, received in zip(server.messages, received_ids(server), strict=False)
    )
    # a rerun (or a backfill, a retry) finds nothing to send
    assert deliver(engine, config, server).get("sent", 0) == 0
    assert len(server.messages) == 30


def test_injection_attempts_in_names_and_emails_never_reach_the_envelope_or_headers(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(
        engine,
        config,
        [
            {"first_name": "Eve\r\nBcc: spy@evil.example", "last_name": 'x", spy2@evil.example'},
            {"email": "victim@example.org\r\nBcc: spy@evil.example"},
            {"email": "victim@example.org, spy@evil.example"},
            {"email": "Victim <victim@example.org>"},
            {"email": "not-an-address"},
        ],
    )
    counts = deliver(engine, config, server)
    assert counts == {"sent": 1, "suppressed_invalid_email": 4}
    assert [m.rcpt_tos for m in server.messages] == [("person0@example.org",)]
    message = server.messages[0].message
    assert "bcc" not in {k.lower() for k in message.keys()}
    assert [a.addr_spec for a in message["To"].addresses] == ["person0@example.org"]
    state = rows(engine)
    assert [state[i].status for i in ids] == ["sent"] + ["suppressed"] * 4
    assert {state[i].reason for i in ids[1:]} == {"invalid_email"}


def test_a_french_recipient_gets_the_fr_FR_template(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(
        engine,
        config,
        [{"locale": "fr_FR", "first_name": "Zoë", "products": ["SKU-1", "SKU-2"]}, {"locale": "en_GB"}],
    )
    deliver(engine, config, server)
    subjects = sorted(m.message["Subject"] for m in server.messages)
    assert subjects == ["Camille, your cart is waiting", "Zoë, votre panier vous attend (2 articles)"]
    french = next(m.message for m in server.messages if "Zoë" in m.message["Subject"])
    assert "Se désabonner" in french.get_body(("html",)).get_content()


def test_a_451_is_retried_after_a_backoff_then_sent(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(3)])
    server.fail_next(2)
    counts = deliver(engine, config, server)
    assert counts["sent"] == 3 and counts["retried"] == 2
    assert received_ids(server) == Counter({i: 1 for i in ids})
    state = rows(engine)
    assert sorted(r.attempts for r in state.values()) == [1, 2, 2] or sorted(
        r.attempts for r in state.values()
    ) == [1, 1, 3]
    assert all(r.status == "sent" and r.reason is None for r in state.values())


def test_a_4xx_that_lasts_ends_failed_after_max_attempts(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    (delivery_id,) = seed(engine, config, [{}])
    server.fail_next(100)
    counts = deliver(engine, config, server, max_attempts=3)
    assert counts == {"failed": 1, "retried": 2}
    row = rows(engine)[delivery_id]
    assert (row.status, row.attempts, row.reason) == ("failed", 3, "gave up after 3 attempts")
    assert row.smtp_reply.startswith("451 ")


def test_a_550_is_recorded_failed_with_the_reply_and_not_retried(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {"email": "gone@example.org"}, {}])
    server.reject("gone@example.org")
    counts = deliver(engine, config, server)
    assert counts == {"sent": 2, "failed": 1, "hard_bounced": 1}  # 5.1.1: also suppressed (test_bounces_smtp)
    row = rows(engine)[ids[1]]
    assert (row.status, row.attempts, row.reason) == ("failed", 1, "smtp_rejected")
    assert row.smtp_reply.startswith("550 5.1.1")
    assert deliver(engine, config, server) == {}
    assert len(server.messages) == 2


def test_a_server_that_goes_down_mid_batch_and_comes_back_loses_nothing_and_sends_nothing_twice(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(60)])
    server.outage_after(20, seconds=1.0)
    server.drop_next(0)
    counts = deliver(engine, config, server, connections=2, batch_size=25)
    assert counts["sent"] == 60 and counts.get("connection_drops", 0) + counts.get("reconnects", 0) >= 1
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert {r.status for r in rows(engine).values()} == {"sent"}


def test_dropped_connections_are_retried_on_a_new_one(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(10)])
    server.drop_next(3)
    counts = deliver(engine, config, server)
    assert counts["sent"] == 10 and counts["connection_drops"] == 3
    assert received_ids(server) == Counter({i: 1 for i in ids})


def test_eligibility_is_checked_again_at_send_time(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {}, {}])
    with engine.begin() as conn:  # opted out after the decision, before the send
        conn.execute(text("UPDATE recipients SET opted_out = :yes WHERE recipient_id = 'r1'"), {"yes": True})
        conn.execute(text("DELETE FROM recipients WHERE recipient_id = 'r2'"))
    counts = deliver(engine, config, server)
    assert counts == {"sent": 1, "suppressed_opted_out": 1, "suppressed_unknown_recipient": 1}
    state = rows(engine)
    assert (state[ids[1]].status, state[ids[1]].reason) == ("suppressed", "opted_out")
    assert received_ids(server) == Counter({ids[0]: 1})


def test_a_template_that_fails_fails_its_delivery_not_the_batch(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, tmp_path: Path
) -> None:
    for path in DEFAULT_TEMPLATES_DIR.glob("cart_abandonment.*"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "cart_abandonment.subject.j2").write_text("{{ recipient.first_name.upper() }}, your cart")
    ids = seed(engine, config, [{}, {"first_name": None}, {}])
    counts = deliver(engine, config, server, templates_dir=tmp_path)
    assert counts == {"sent": 2, "render_failed": 1}
    row = rows(engine)[ids[1]]
    assert row.status == "failed" and row.reason.startswith("template_error: ") and "upper" in row.reason
    assert received_ids(server) == Counter({ids[0]: 1, ids[2]: 1})


def test_an_unreachable_relay_fails_the_run_and_gives_the_rows_back(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(5)])
    server.stop()
    smtp = SimpleNamespace(
        host="127.0.0.1",
        port=server.port,
        login="user",
        password="s3cret-password",
        extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 1},
    )
    with pytest.raises(SmtpUnavailableError, match="cannot reach the SMTP relay") as raised:
        deliver_pending(
            engine,
            config,
            settings_of(smtp),
            DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t"),
        )
    assert "s3cret" not in str(raised.value)
    state = rows(engine)
    assert all((state[i].status, state[i].attempts) == ("pending", 0) for i in ids)


def test_login_is_used_and_a_refused_login_names_the_user_not_the_password(
    engine: Engine, config: TriggersConfig
) -> None:
    seed(engine, config, [{}])
    with LocalSmtpServer(credentials=("shop", "right-password")) as secured:

        def settings(password: str) -> SmtpSettings:
            return settings_of(
                SimpleNamespace(
                    host="127.0.0.1",
                    port=secured.port,
                    login="shop",
                    password=password,
                    extra_dejson={"disable_ssl": "true", "disable_tls": "true", "retry_limit": 0},
                )
            )

        with pytest.raises(SmtpUnavailableError, match="refused the login of 'shop'") as raised:
            deliver_pending(
                engine,
                config,
                settings("wrong-password"),
                DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t"),
            )
        assert "wrong-password" not in str(raised.value)
        counts = deliver_pending(
            engine,
            config,
            settings("right-password"),
            DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t"),
        )
        assert counts["sent"] == 1 and len(secured.messages) == 1


def test_a_backfill_interval_sends_only_the_deliveries_of_its_events(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {}])
    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET event_time = 1000.0 WHERE delivery_id = :d"), {"d": ids[0]})
    assert deliver(engine, config, server, interval=(900.0, 1100.0)) == {"sent": 1}
    assert received_ids(server) == Counter({ids[0]: 1})


KILLED_WORKER = textwrap.dedent(
    """
    import json, sys
    from types import SimpleNamespace
    from include.config import DEFAULT_TEMPLATES_DIR, load_config
    from include.database.engine import make_engine
    from include.delivery.hook import PipeliningSmtpHook
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    url, port, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    config = load_config(None, DEFAULT_TEMPLATES_DIR)
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"rate": None})})
    smtp = PipeliningSmtpHook.for_connection(SimpleNamespace(host="127.0.0.1", port=port, login=None, password=None,
                                             extra_dejson={"disable_ssl": True, "disable_tls": True})).session_settings()
    deliver_pending(make_engine(url), config, smtp, DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="doomed",
                    **options))
    """
)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_then_rerun_sends_at_most_the_in_flight_messages_twice(
    db_url: str, engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(200)])
    server.faults.delay = 0.01  # a slow relay, so the kill lands mid-batch
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_WORKER,
            db_url,
            str(server.port),
            json.dumps({"connections": 2, "window": 1, "batch_size": 40}),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert server.wait_for(50, timeout=60), "the worker sent nothing"
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait()
    before = Counter(r.status for r in rows(engine).values())
    assert before["sending"] > 0 and before["pending"] > 0  # killed mid-batch, with claimed rows
    server.faults.delay = 0.0
    counts = deliver(engine, config, server, connections=2)
    assert counts["requeued_interrupted"] == before["sending"]
    received = received_ids(server)
    assert set(received) == set(ids)  # nothing lost
    twice = [i for i, n in received.items() if n > 1]
    print(f"killed with {before['sending']} rows in 'sending'; sent twice: {len(twice)}")
    assert max(received.values()) <= 2 and len(twice) <= 2  # at most connections x window = 2 x 1
    assert {r.status for r in rows(engine).values()} == {"sent"}


def test_large_runs_render_in_a_render_process_with_the_same_outcomes(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, tmp_path: Path
) -> None:
    for path in DEFAULT_TEMPLATES_DIR.glob("cart_abandonment.*"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "cart_abandonment.subject.j2").write_text("{{ recipient.first_name.upper() }}, your cart")
    people: list[dict[str, Any]] = [{} for _ in range(600)]
    people[250] = {"first_name": None}  # template error, in the second batch (rendered by the render process)
    people[300] = {"email": "victim@example.org\r\nBcc: spy@evil.example"}
    people[350] = {"opted_out": True}
    ids = seed(engine, config, people)
    counts = deliver(engine, config, server, templates_dir=tmp_path, batch_size=200, render_processes=1)
    assert counts == {
        "sent": 597,
        "render_failed": 1,
        "suppressed_invalid_email": 1,
        "suppressed_opted_out": 1,
    }
    state = rows(engine)
    assert state[ids[250]].reason.startswith("template_error: ") and "upper" in state[ids[250]].reason
    assert (state[ids[300]].reason, state[ids[350]].reason) == ("invalid_email", "opted_out")
    assert received_ids(server) == Counter({i: 1 for n, i in enumerate(ids) if n not in (250, 300, 350)})
    assert all(
        m.rcpt_tos == (state[received].email,)
        for m, received in zip(server.messages, received_ids(server), strict=False)
    )
