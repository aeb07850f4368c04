"""Bounces, complaints and mailto unsubscribes read from a real IMAP server (Dovecot) holding
real-world reports, on SQLite and PostgreSQL: what each changes, where each report is filed,
and that reading the same reports again changes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from include.bounces import mailbox
from include.bounces.apply import apply_report
from include.bounces.mailbox import IGNORED_KEYWORD, MailboxOptions, open_mailbox, read_mailbox
from include.config import TriggersConfig
from include.errors import MailboxUnavailableError
from include.suppressions.unsubscribe import make_token, unsubscribe_secret
from tests.integration.dovecot import PASSWORD, Dovecot, dovecot_server, message_from_fixture  # noqa: F401
from tests.integration.test_delivery import ROOT, seed

BOUNCE_ADDRESS = "bounces+{delivery_id}@mail.shop.example"
PEOPLE = ["ann", "bob", "cid", "dan", "eve"]
UNKNOWN_DELIVERY = "f" * 32


def sent(engine: Engine, config: TriggersConfig) -> dict[str, str]:
    """One sent delivery per person: name -> delivery id."""
    ids = seed(engine, config, [{"email": f"{name.capitalize()}@Example.org"} for name in PEOPLE])
    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'sent', sent_at = :t"), {"t": time.time()})
    return dict(zip(PEOPLE, ids, strict=True))


def report(
    name: str, number: int, delivery_id: str = "", recipient: str = "", campaign: str = "c1", token: str = ""
) -> bytes:
    return message_from_fixture(
        name,
        delivery_id=delivery_id,
        recipient=recipient,
        campaign_id=campaign,
        report_id=f"report-{number}",
        bounce_domain="mail.shop.example",
        token=token,
    )


def token_for(engine: Engine, delivery_id: str) -> str:
    """The signed token delivery put in the email's links (the URL and the mailto subject)."""
    with engine.connect() as conn:
        email, campaign_id = conn.execute(
            text("SELECT email, campaign_id FROM deliveries WHERE delivery_id = :id"), {"id": delivery_id}
        ).one()
    return make_token(unsubscribe_secret(engine), delivery_id, email, campaign_id)


def the_mailbox(engine: Engine, ids: dict[str, str]) -> list[bytes]:
    """One message of each kind, and the bad ones."""
    return [
        report("postfix_hard_bounce", 1, ids["ann"], "ann@example.org"),
        report("postfix_mailbox_full", 2, ids["bob"], "bob@example.org"),
        report("postfix_delayed", 3, ids["cid"], "cid@example.org"),  # found by its Message-ID only
        report("yahoo_complaint", 4, ids["dan"], "dan@example.org"),
        report("mailto_unsubscribe", 5, recipient="eve@example.org", token=token_for(engine, ids["eve"])),
        report("customer_reply", 6, ids["ann"], "ann@example.org"),
        report("broken_report", 7, ids["bob"]),
        report("postfix_hard_bounce", 8, UNKNOWN_DELIVERY, "nobody@example.org"),
        report("gmail_style_complaint_redacted", 9, recipient="zed@example.org"),  # no one we know
        # a recipient we know, but no delivery of ours: anyone can send that, so it suppresses no one
        report("gmail_style_complaint_redacted", 10, recipient="CID@example.org"),
    ]


def database(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            "deliveries": sorted(
                conn.execute(text("SELECT delivery_id, status, reason FROM deliveries")).all()
            ),
            "suppressions": sorted(
                conn.execute(text("SELECT email, campaign_id, reason, source FROM suppressions")).all()
            ),
            "reports": sorted(
                conn.execute(
                    text("SELECT report_id, kind, delivery_id, email, outcome FROM mailbox_reports")
                ).all()
            ),
        }


def read(engine: Engine, server: Dovecot, **options: Any) -> dict[str, int]:
    settings = MailboxOptions(bounce_address=BOUNCE_ADDRESS, **options)
    with server.client() as client:
        return read_mailbox(engine, client, settings)


def test_a_read_applies_each_report_once_and_files_it(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    ids = sent(engine, config)
    dovecot.append(*the_mailbox(engine, ids))

    counts = read(engine, dovecot)

    assert counts == {
        "read": 10,
        "hard_bounce": 1,
        "bounced": 1,
        "delayed": 1,
        "complaint": 1,
        "unsubscribed": 1,
        "processed": 5,
        "other": 1,
        "left_alone": 1,
        "unparsed": 1,
        "unknown_delivery": 3,
        "set_aside": 4,
    }
    state = database(engine)
    rows = {d: (status, reason) for d, status, reason in state["deliveries"]}
    assert rows[ids["ann"]][0] == "bounced" and "5.1.1" in rows[ids["ann"]][1]
    assert "User unknown" in rows[ids["ann"]][1]
    assert rows[ids["bob"]][0] == "bounced" and "5.2.2" in rows[ids["bob"]][1]  # bounced, not suppressed
    assert rows[ids["cid"]] == ("sent", None)  # a delay changes nothing
    assert rows[ids["dan"]] == ("sent", "complaint")
    assert rows[ids["eve"]] == ("sent", None)
    suppressed = {(email, reason, source) for email, scope, reason, source in state["suppressions"]}
    assert {s[:2] for s in suppressed} == {
        ("ann@example.org", "hard_bounce"),
        ("dan@example.org", "complaint"),
        ("eve@example.org", "unsubscribed"),
    }
    assert ("ann@example.org", "hard_bounce", ids["ann"]) in suppressed
    assert all(scope == "" for _, scope, _, _ in state["suppressions"])  # every campaign
    assert len(state["reports"]) == 5  # the handled ones; the set-aside ones may come back

    inbox = dovecot.folder("INBOX")
    assert len(inbox) == 1 and b"Is the blue one still in stock?" in inbox[0][1]
    assert IGNORED_KEYWORD.encode() in inbox[0][0] and b"\\Seen" not in inbox[0][0]  # still unread
    assert len(dovecot.messages("Triggers/Processed")) == 5
    set_aside = dovecot.messages("Triggers/Unprocessed")
    assert len(set_aside) == 4
    for number in (7, 8, 9, 10):  # unparsed, a delivery we never sent, complaints naming none of ours
        assert any(f"<report-{number}@".encode() in message for message in set_aside), number


def test_reading_again_changes_nothing_even_when_the_reports_come_back(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    ids = sent(engine, config)
    dovecot.append(*the_mailbox(engine, ids))
    read(engine, dovecot)
    before = database(engine)

    assert read(engine, dovecot) == {}  # the customer's reply is skipped, not counted again
    dovecot.append(*dovecot.messages("Triggers/Processed"))  # the same reports delivered again
    counts = read(engine, dovecot)

    assert counts == {"read": 5, "duplicate": 5, "processed": 5}
    assert database(engine) == before
    assert len(dovecot.messages("Triggers/Processed")) == 10


def test_a_connection_lost_between_the_commit_and_the_move_is_a_duplicate_next_time(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's changes are committed, then the IMAP connection drops before it is moved: the
    read fails naming the mailbox, the report stays in the inbox, and the next read only files it."""
    ids = sent(engine, config)
    dovecot.append(report("postfix_hard_bounce", 1, ids["ann"], "ann@example.org"))
    client = dovecot.client()

    def apply_then_drop(*args: Any) -> Any:
        applied = apply_report(*args)
        client.sock.shutdown(socket.SHUT_RDWR)  # a real drop: the MOVE goes nowhere
        return applied

    monkeypatch.setattr(mailbox, "apply_report", apply_then_drop)
    with pytest.raises(MailboxUnavailableError, match="failed mid-read"):
        read_mailbox(engine, client, MailboxOptions(bounce_address=BOUNCE_ADDRESS))
    client.sock.close()
    monkeypatch.undo()
    after_crash = database(engine)
    assert [r[4] for r in after_crash["reports"]] == ["hard_bounce"]
    assert ("ann@example.org", "", "hard_bounce", ids["ann"]) in after_crash["suppressions"]
    assert len(dovecot.messages("INBOX")) == 1 and dovecot.messages("Triggers/Processed") == []

    assert read(engine, dovecot) == {"read": 1, "duplicate": 1, "processed": 1}
    assert database(engine) == after_crash
    assert dovecot.messages("INBOX") == [] and len(dovecot.messages("Triggers/Processed")) == 1


def test_a_mailto_unsubscribe_needs_the_signed_token_of_the_email(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    """The delivery id travels in the Message-ID of every reply and forward: a subject carrying it
    bare, or a token with one character changed, is set aside and suppresses no one."""
    ids = sent(engine, config)
    good = token_for(engine, ids["eve"])
    # a character inside the signature: the last one also holds padding bits the decoder ignores
    altered = good[:-5] + ("A" if good[-5] != "A" else "B") + good[-4:]
    forged = make_token(b"someone-else's-key-0123456789", ids["eve"], "eve@example.org", "cart_abandonment")
    dovecot.append(
        report("mailto_unsubscribe", 1, recipient="eve@example.org", token=ids["eve"]),
        report("mailto_unsubscribe", 2, recipient="eve@example.org", token=altered),
        report("mailto_unsubscribe", 3, recipient="eve@example.org", token=forged),
    )

    assert read(engine, dovecot) == {"read": 3, "invalid_token": 3, "set_aside": 3}
    assert database(engine)["suppressions"] == [] and database(engine)["reports"] == []
    assert len(dovecot.messages("Triggers/Unprocessed")) == 3

    dovecot.append(report("mailto_unsubscribe", 4, recipient="eve@example.org", token=good))
    assert read(engine, dovecot) == {"read": 1, "unsubscribed": 1, "processed": 1}
    assert [s[:3] for s in database(engine)["suppressions"]] == [("eve@example.org", "", "unsubscribed")]


def test_the_mailto_of_a_rendered_email_unsubscribes_its_recipient(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    """The message a mail client sends for the List-Unsubscribe mailto of an email that delivery
    rendered (its signing key, its row) unsubscribes that email's recipient."""
    from email import message_from_bytes, policy

    from include.config import DEFAULT_TEMPLATES_DIR
    from include.delivery.render_pool import RECIPIENT_COLUMNS, CampaignSpec, RowRenderer

    ids = sent(engine, config)
    with engine.connect() as conn:
        found = conn.execute(text("SELECT * FROM deliveries WHERE delivery_id = :id"), {"id": ids["eve"]})
        row: dict[str, Any] = dict(found.mappings().one())
    row.update({f"r_{c}": None for c in RECIPIENT_COLUMNS}, e_payload=None, e_trigger_id="t")
    campaign = CampaignSpec(row["campaign_id"], "cart_abandonment", "Shop <shop@example.com>")
    renderer = RowRenderer(
        DEFAULT_TEMPLATES_DIR,
        "unsubscribe@shop.example",
        "https://u.example/{token}",
        {campaign.id: campaign},
        unsubscribe_secret(engine),
    )
    rendered = message_from_bytes(renderer.render_row(row).data, policy=policy.default)
    subject = str(rendered["List-Unsubscribe"]).split("?subject=")[1].rstrip(">")
    assert ids["eve"] not in subject and len(f"Subject: {subject}") < 200
    dovecot.append(
        f"From: eve@example.org\r\nTo: unsubscribe@shop.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <reply-1@example.org>\r\n\r\n\r\n".encode()
    )

    assert read(engine, dovecot) == {"read": 1, "unsubscribed": 1, "processed": 1}
    assert [s[:3] for s in database(engine)["suppressions"]] == [("eve@example.org", "", "unsubscribed")]


def test_a_report_about_an_email_whose_send_is_not_recorded_yet_waits_in_the_inbox(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    """The relay bounced it before the run recorded it ``sent`` (or a retry is ``pending``): the
    report stays in the inbox, unflagged, and the read after the send is recorded applies it."""
    ids = sent(engine, config)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE deliveries SET status = 'sending' WHERE delivery_id = :id"), {"id": ids["ann"]}
        )
        conn.execute(
            text("UPDATE deliveries SET status = 'pending' WHERE delivery_id = :id"), {"id": ids["dan"]}
        )
    dovecot.append(
        report("postfix_hard_bounce", 1, ids["ann"], "ann@example.org"),
        report("yahoo_complaint", 2, ids["dan"], "dan@example.org"),
    )

    assert read(engine, dovecot) == {"read": 2, "not_yet_recorded": 2, "waiting": 2}
    assert database(engine)["suppressions"] == [] and database(engine)["reports"] == []
    assert len(dovecot.folder("INBOX")) == 2 and dovecot.messages("Triggers/Unprocessed") == []
    assert all(IGNORED_KEYWORD.encode() not in flags for flags, _ in dovecot.folder("INBOX"))

    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'sent'"))
    assert read(engine, dovecot) == {"read": 2, "hard_bounce": 1, "complaint": 1, "processed": 2}
    assert {s[:3] for s in database(engine)["suppressions"]} == {
        ("ann@example.org", "", "hard_bounce"),
        ("dan@example.org", "", "complaint"),
    }
    assert dovecot.messages("INBOX") == []


def test_a_forwarded_copy_bouncing_elsewhere_does_not_suppress_our_address(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    """Ann forwards her mail to an address that no longer exists: the DSN comes back to our VERP
    address naming that other address; Ann's delivery is bounced, Ann is not suppressed."""
    ids = sent(engine, config)
    dovecot.append(report("postfix_hard_bounce", 1, ids["ann"], "ann.old@forwarded.example"))

    assert read(engine, dovecot) == {"read": 1, "bounced": 1, "processed": 1}
    state = database(engine)
    assert state["suppressions"] == []
    bounced = {d: (status, reason) for d, status, reason in state["deliveries"]}[ids["ann"]]
    assert bounced[0] == "bounced" and "ann.old@forwarded.example" in bounced[1]


def test_a_limit_reads_the_oldest_first_and_the_rest_next_time(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    ids = sent(engine, config)
    dovecot.append(*the_mailbox(engine, ids))
    first = read(engine, dovecot, limit=2)
    assert first == {"read": 2, "hard_bounce": 1, "bounced": 1, "processed": 2}
    rest = read(engine, dovecot)
    assert rest["read"] == 8 and rest["processed"] == 3


def test_the_command_reads_through_imap_default(
    db_url: str, engine: Engine, config: TriggersConfig, dovecot: Dovecot, tmp_path: Any
) -> None:
    ids = sent(engine, config)
    dovecot.append(*the_mailbox(engine, ids)[:3])
    environment = {
        **os.environ,
        "TRIGGERS_DB_URL": db_url,
        "TRIGGERS_BOUNCE_ADDRESS": BOUNCE_ADDRESS,
        "AIRFLOW_CONN_IMAP_DEFAULT": json.dumps(dovecot.connection()),
        "AIRFLOW_HOME": str(tmp_path),
    }
    command = [sys.executable, "-m", "include.cli", "bounces", "read", "--limit", "2"]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "read": 2,
        "hard_bounce": 1,
        "bounced": 1,
        "processed": 2,
    }
    assert PASSWORD not in done.stdout + done.stderr
    assert len(dovecot.messages("INBOX")) == 1


def test_a_wrong_password_or_a_missing_connection_is_named_without_the_password(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_IMAP_DEFAULT", raising=False)
    with pytest.raises(MailboxUnavailableError, match="no Airflow connection 'imap_default'"):
        with open_mailbox("imap_default"):
            pass
    wrong = {**dovecot.connection(), "password": "not-the-password-123"}
    monkeypatch.setenv("AIRFLOW_CONN_IMAP_DEFAULT", json.dumps(wrong))
    with pytest.raises(MailboxUnavailableError, match="imap_default") as raised:
        with open_mailbox("imap_default"):
            pass
    assert "not-the-password-123" not in str(raised.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("TRIGGERS_FEEDBACK_PROCESSED_FOLDER", 'Bad"Name'),
        ("TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER", "INBOX"),
        ("TRIGGERS_BOUNCE_ADDRESS", "bounces@shop.example"),
    ],
)
def test_a_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch, setting: str, value: str) -> None:
    from include.errors import ConfigError

    monkeypatch.setenv(setting, value)
    with pytest.raises(
        ConfigError, match=setting if setting != "TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER" else "three"
    ):
        MailboxOptions.from_env()


def test_whatever_lands_in_the_mailbox_is_read_without_error_and_none_is_lost(
    engine: Engine, config: TriggersConfig, dovecot: Dovecot
) -> None:
    """Arbitrary bytes and mutated real reports: each message read ends up in exactly one place
    (processed, set aside, or left in the inbox), and a second read finds nothing new."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.unit.test_bounce_reports import mutated_reports

    ids = sent(engine, config)
    real = the_mailbox(engine, ids)
    total = {"appended": 0}

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.binary(min_size=1, max_size=2000) | mutated_reports() | st.sampled_from(real), max_size=4)
    )
    def read_a_batch(messages: list[bytes]) -> None:
        appended = 0
        with dovecot.client() as client:
            for message in messages:  # the server may refuse some bytes (NUL...): those never landed
                typ, _ = client.append('"INBOX"', None, None, message)
                appended += typ == "OK"
        counts = read(engine, dovecot)
        total["appended"] += appended
        assert counts.get("read", 0) == appended
        filed = ("processed", "set_aside", "left_alone", "waiting")
        assert sum(counts.get(key, 0) for key in filed) == appended
        assert read(engine, dovecot) == {}

    read_a_batch()
    kept = sum(len(dovecot.messages(f)) for f in ("INBOX", "Triggers/Processed", "Triggers/Unprocessed"))
    assert kept == total["appended"]
