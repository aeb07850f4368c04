"""Bounces at send time, against the local SMTP server on SQLite and PostgreSQL: a 5xx saying the
address is bad fails the delivery and suppresses the address in the same transaction, other
refusals do not; the envelope sender carries the delivery (VERP) when TRIGGERS_BOUNCE_ADDRESS
is set, and a bad template stops the run before anything is claimed."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import Engine, text

from include.config import TriggersConfig
from include.errors import ConfigError
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import deliver, rows, seed


def suppressions(engine: Engine) -> list[tuple[str, str, str, str]]:
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT email, campaign_id, reason, source FROM suppressions")).all())


def test_a_550_5_1_1_at_rcpt_fails_the_delivery_and_suppresses_the_address(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {"email": "Gone@Example.org"}, {}])
    server.reject("gone@example.org")  # 550 5.1.1 Mailbox unavailable

    counts = deliver(engine, config, server)

    assert counts == {"sent": 2, "failed": 1, "hard_bounced": 1}
    row = rows(engine)[ids[1]]
    assert (row.status, row.reason) == ("failed", "smtp_rejected")
    assert row.smtp_reply.startswith("550 5.1.1")
    assert suppressions(engine) == [("gone@example.org", "", "hard_bounce", ids[1])]


@pytest.mark.parametrize(
    ("reply", "at", "status"),
    [
        ("550 5.7.1 Message refused by local policy", "RCPT", "failed"),  # about the message, not the address
        ("552 5.2.2 Mailbox full", "DATA", "failed"),
        ("550 Requested action not taken: mailbox unavailable", "RCPT", "failed"),  # no enhanced code
        ("450 4.1.1 Recipient address verification in progress", "RCPT", "pending"),  # 4xx: a retry
    ],
)
def test_other_refusals_fail_or_retry_the_delivery_without_suppressing(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, reply: str, at: str, status: str
) -> None:
    (delivery_id,) = seed(engine, config, [{"email": "someone@example.org"}])
    server.fail_next(1, reply, at=at)
    counts = deliver(engine, config, server, wait_for_retries=0, retry_delay=60)
    assert rows(engine)[delivery_id].status == status
    assert "hard_bounced" not in counts
    assert suppressions(engine) == []


def test_hard_bounces_with_one_text_for_every_address_do_not_stop_the_run(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    """Gmail answers every unknown address with the same words: that is not a relay refusing us."""
    people = [{"email": f"gone{i}@example.org"} for i in range(7)] + [{"email": "here@example.org"}]
    seed(engine, config, people)
    server.reject(*(p["email"] for p in people[:7]), reply="550 5.1.1 The email account does not exist")
    counts = deliver(engine, config, server, max_same_refusals=3)
    assert counts == {"sent": 1, "failed": 7, "hard_bounced": 7}
    assert Counter(reason for _, _, reason, _ in suppressions(engine)) == {"hard_bounce": 7}


def test_the_envelope_sender_carries_the_delivery_when_a_bounce_address_is_set(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed(engine, config, [{}, {}])
    monkeypatch.setenv("TRIGGERS_BOUNCE_ADDRESS", "bounces+{delivery_id}@Mail.Shop.example")
    deliver(engine, config, server)
    by_id = {m.message_id.strip("<>").split("@")[0]: m for m in server.messages}
    assert {i: by_id[i].mail_from for i in ids} == {i: f"bounces+{i}@mail.shop.example" for i in ids}
    assert all(m["From"] == "Shop <shop@example.com>" for m in server.messages)  # the header is unchanged


def test_without_a_bounce_address_the_envelope_sender_is_the_campaign_sender(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIGGERS_BOUNCE_ADDRESS", raising=False)
    seed(engine, config, [{}])
    deliver(engine, config, server)
    assert [m.mail_from for m in server.messages] == ["shop@example.com"]


@pytest.mark.parametrize(
    "template",
    [
        "bounces@shop.example",
        "bounces+{delivery_id}",
        "{delivery_id}@shop.example@x",
        "a{delivery_id}" + "b" * 40 + "@x.example",
    ],
)
def test_a_bad_bounce_address_is_named_before_anything_is_claimed(
    engine: Engine,
    config: TriggersConfig,
    server: LocalSmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    template: str,
) -> None:
    seed(engine, config, [{}])
    monkeypatch.setenv("TRIGGERS_BOUNCE_ADDRESS", template)
    with pytest.raises(ConfigError, match="TRIGGERS_BOUNCE_ADDRESS"):
        deliver(engine, config, server)
    assert {r.status for r in rows(engine).values()} == {"pending"}
    assert all(r.attempts == 0 for r in rows(engine).values())
    assert not server.messages
