"""The pure parts of bounce handling: which refusals are hard bounces, the VERP address both
ways, and the parsing of mailbox messages (real-world reports, then arbitrary and mutated bytes:
parse_report never raises and always says what the message is)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include.bounces.codes import enhanced_status, is_hard_bounce_reply, is_hard_status
from include.bounces.reports import KINDS, MAX_TEXT, Report, parse_report
from include.bounces.verp import bounce_address_for, bounce_address_template, delivery_id_pattern
from include.errors import ConfigError
from tests.integration.dovecot import FIXTURES, message_from_fixture

TEMPLATE = "bounces+{delivery_id}@mail.shop.example"
DELIVERY = "0123456789abcdef0123456789abcdef"
VALUES = {
    "delivery_id": DELIVERY,
    "recipient": "Ann@Example.org",
    "campaign_id": "cart_abandonment",
    "report_id": "r-1",
    "bounce_domain": "mail.shop.example",
    "token": "ZDE.1796554960.c2lnbmF0dXJl",
}
REAL = {path.stem: message_from_fixture(path.stem, **VALUES) for path in sorted(FIXTURES.glob("*.eml"))}


@pytest.mark.parametrize(
    ("reply", "hard"),
    [
        ("550 5.1.1 <a@b.example>: Recipient address rejected: User unknown", True),
        ("550-5.1.1 The email account that you tried to reach does not exist", True),
        ("550 5.1.2 Host unknown", True),
        ("550 5.1.10 Recipient address has null MX", True),
        ("550 5.1.6 Mailbox has moved", True),
        ("550 5.2.1 Mailbox disabled, not accepting messages", True),
        ("550 5.1.0 Address rejected", False),  # unspecified: not said to be bad
        ("553 5.1.8 Sender address domain does not exist", False),  # about our sender
        ("550 5.7.1 Message rejected as spam", False),
        ("552 5.2.2 Mailbox full", False),
        ("450 4.1.1 Try again later", False),  # 4xx: a retry, whatever the code
        ("550 User unknown", False),  # no enhanced code
        ("550 5.1.1.2 looks like an address", False),
        ("", False),
    ],
)
def test_a_hard_bounce_is_a_5xx_whose_code_says_the_address_is_bad(reply: str, hard: bool) -> None:
    assert is_hard_bounce_reply(reply) is hard


def test_enhanced_status_reads_the_code_and_drops_leading_zeros() -> None:
    assert enhanced_status("smtp; 550 5.01.001 no") == "5.1.1"
    assert enhanced_status("no code here 127.0.0.1") is None
    assert is_hard_status("5.1.1") and not is_hard_status("4.1.1") and not is_hard_status(None)


def test_the_verp_address_names_its_delivery_and_is_read_back() -> None:
    assert bounce_address_template(TEMPLATE) == TEMPLATE
    address = bounce_address_for(TEMPLATE, DELIVERY)
    assert address == f"bounces+{DELIVERY}@mail.shop.example" and len(address.split("@")[0]) <= 64
    found = delivery_id_pattern(TEMPLATE).findall(f"To: <BOUNCES+{DELIVERY}@Mail.Shop.Example>, x")
    assert found == [DELIVERY]
    assert delivery_id_pattern(TEMPLATE).findall(f"xbounces+{DELIVERY}@mail.shop.example") == []
    assert bounce_address_template("") is None


@pytest.mark.parametrize(
    "template",
    [
        "bounces@shop.example",
        "{delivery_id}{delivery_id}@x.example",
        "b+{delivery_id}",
        "b@{delivery_id}.example",
    ],
)
def test_a_bad_bounce_address_template_is_named(template: str) -> None:
    with pytest.raises(ConfigError, match="TRIGGERS_BOUNCE_ADDRESS"):
        bounce_address_template(template)


def test_a_postfix_hard_bounce_names_its_delivery_status_and_diagnostic() -> None:
    report = parse_report(REAL["postfix_hard_bounce"], TEMPLATE)
    assert (report.kind, report.report_id, report.delivery_ids) == (
        "dsn",
        "<r-1@mail.example.org>",
        (DELIVERY,),
    )
    worst = report.worst()
    assert worst is not None and (worst.action, worst.status) == ("failed", "5.1.1")
    assert worst.diagnostic.startswith("smtp; 550 5.1.1 <Ann@Example.org>: Recipient address rejected: User")
    assert report.addresses == ("Ann@example.org",) and report.campaign_id == "cart_abandonment"


def test_without_verp_the_returned_message_id_names_the_delivery() -> None:
    assert parse_report(REAL["postfix_hard_bounce"], None).delivery_ids == (DELIVERY,)
    delayed = parse_report(REAL["postfix_delayed"], TEMPLATE)
    assert delayed.kind == "dsn" and delayed.delivery_ids == (DELIVERY,)
    assert delayed.worst() is not None and delayed.worst().action == "delayed"


def test_an_arf_complaint_names_its_type_delivery_and_address() -> None:
    report = parse_report(REAL["yahoo_complaint"], TEMPLATE)
    assert (report.kind, report.feedback_type, report.delivery_ids[0]) == ("arf", "abuse", DELIVERY)
    assert report.addresses == ("Ann@example.org",)
    redacted = parse_report(REAL["gmail_style_complaint_redacted"], TEMPLATE)
    assert redacted.kind == "arf" and DELIVERY not in redacted.delivery_ids


def test_the_other_kinds() -> None:
    assert parse_report(REAL["mailto_unsubscribe"], TEMPLATE).kind == "unsubscribe"
    unsubscribe = parse_report(REAL["mailto_unsubscribe"], TEMPLATE)
    assert (unsubscribe.token, unsubscribe.delivery_ids) == (VALUES["token"], ())  # checked when applied
    assert parse_report(REAL["customer_reply"], TEMPLATE).kind == "other"
    broken = parse_report(REAL["broken_report"], TEMPLATE)
    assert broken.kind == "unparsed" and broken.problem == "no delivery-status part"


def test_an_unsubscribe_subject_gives_the_whole_signed_token() -> None:
    from include.suppressions.unsubscribe import make_token

    token = make_token(b"k" * 32, DELIVERY, "ann@example.org", "cart_abandonment", issued=1796554960)
    report = parse_report(_plain("ann@example.org", "unsubscribe@shop.example", f"Re: unsubscribe-{token}"))
    assert (report.kind, report.token, report.delivery_ids) == ("unsubscribe", token, ())
    assert 80 < len(token) < 120


def _plain(sender: str, to: str, subject: str, extra: str = "") -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <m-1@x.example>\r\n{extra}"
    return (head + "\r\nbody\r\n").encode()


def test_only_a_bounce_that_cannot_be_read_is_unparsed_not_an_auto_reply_or_a_read_receipt() -> None:
    verp = bounce_address_for(TEMPLATE, DELIVERY)
    qmail = _plain("MAILER-DAEMON@mx.example", verp, "failure notice")
    assert parse_report(qmail, TEMPLATE).kind == "unparsed"
    assert parse_report(qmail, TEMPLATE).delivery_ids == (DELIVERY,)
    exchange = _plain("Mail System <system@mx.example>", verp, "Undeliverable: You left something")
    assert parse_report(exchange, TEMPLATE).kind == "unparsed"
    out_of_office = _plain("ann@example.org", verp, "Out of office", "Auto-Submitted: auto-replied\r\n")
    assert parse_report(out_of_office, TEMPLATE).kind == "other"
    receipt = _plain(
        "ann@example.org",
        "shop@example.com",
        "Read: your cart",
        'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n',
    )
    assert parse_report(receipt, TEMPLATE).kind == "other"


def test_a_report_without_a_message_id_is_named_by_its_bytes() -> None:
    data = REAL["postfix_hard_bounce"].replace(b"Message-Id: <r-1@mail.example.org>\r\n", b"")
    first, again = parse_report(data, TEMPLATE), parse_report(data, TEMPLATE)
    assert first.report_id.startswith("sha256:") and first.report_id == again.report_id
    assert parse_report(data + b"\r\n", TEMPLATE).report_id != first.report_id


def _sound(report: Report) -> None:
    assert isinstance(report, Report) and report.kind in KINDS and report.report_id
    assert len(report.problem) <= MAX_TEXT and all(len(r.diagnostic) <= MAX_TEXT for r in report.recipients)
    if report.kind == "dsn":
        assert report.recipients
    if report.kind == "unparsed":
        assert report.problem


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _sound(parse_report(data, TEMPLATE))


@st.composite
def mutated_reports(draw: st.DrawFn) -> bytes:
    """A real report with a few of its bytes replaced, removed or inserted, or cut short."""
    data = bytearray(REAL[draw(st.sampled_from(sorted(REAL)))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "delete", "insert", "cut"]))
        piece = draw(
            st.binary(min_size=1, max_size=20) | st.sampled_from([b"\r\n\r\n", b"--", b";", b"=?", b"\x00"])
        )
        if action == "replace":
            data[at : at + len(piece)] = piece
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 200))]
        elif action == "insert":
            data[at:at] = piece
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_reports())
def test_mutated_real_reports_never_raise(data: bytes) -> None:
    _sound(parse_report(data, TEMPLATE))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_arbitrary_header_values_never_raise(subject: str, status: str) -> None:
    data = REAL["postfix_hard_bounce"].replace(
        b"Status: 5.1.1", f"Status: {status}".encode("utf-8", "replace")
    )
    data = data.replace(b"Subject: Undelivered", f"Subject: {subject}".encode("utf-8", "surrogateescape"))
    _sound(parse_report(data, TEMPLATE))
