"""What a message in the bounce mailbox says: its bytes -> a :class:`Report`, no IO.

Four kinds are recognised:

* ``dsn``: a delivery status notification (RFC 3464): ``multipart/report;
  report-type=delivery-status`` with a ``message/delivery-status`` part whose per-recipient
  blocks give ``Action``, ``Status``, ``Diagnostic-Code``, ``Final-Recipient`` and
  ``Original-Recipient``;
* ``arf``: a feedback-loop report (ARF, RFC 5965): ``report-type=feedback-report`` with a
  ``message/feedback-report`` part (``Feedback-Type: abuse``...);
* ``unsubscribe``: a message whose subject is ``unsubscribe-<token>`` (the ``mailto:`` of
  ``List-Unsubscribe``; the token is the one-click link's signed token, checked when applied);
* ``other``: anything else (a human's reply, an auto-reply), left alone.

``unparsed`` is a bounce we cannot read: a report whose status or feedback part is missing or
empty, or a non-standard bounce (from ``MAILER-DAEMON`` or ``postmaster``, or sent to our VERP
address under a failure subject; an out-of-office reply sent there is ``other``). Its
``problem`` says why.

The delivery a report is about is looked for, most trusted first, in the VERP address the
report was sent to (``To``, ``X-Original-To``, ``Delivered-To``, ``Envelope-To``,
``Return-Path``, and the returned message's ``Return-Path``), then in the returned message's
``Message-ID`` (``<delivery_id@domain>``). :func:`parse_report` never raises: whatever bytes it
is given, it returns a Report.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import HeaderParser

from include.bounces.verp import delivery_id_pattern
from include.errors import InvalidEmailError
from include.suppressions.addresses import normalize_email
from include.suppressions.unsubscribe import MAX_TOKEN_LENGTH

KINDS = ("dsn", "arf", "unsubscribe", "other", "unparsed")
MAX_TEXT = 300  # characters kept of a diagnostic or a problem
MAX_PARTS = 200  # parts looked at in one message: a report has three or four
_ENVELOPE_HEADERS = ("X-Original-To", "Delivered-To", "Envelope-To", "To", "Return-Path")
_UNSUBSCRIBE = re.compile(rf"\bunsubscribe-([A-Za-z0-9_.-]{{1,{MAX_TOKEN_LENGTH}}})", re.IGNORECASE)
_MESSAGE_ID_LOCAL = re.compile(r"<\s*([A-Za-z0-9][A-Za-z0-9_.-]{0,63})@[^<>\s]+>")
_ADDRESS = re.compile(r"[^\s<>(),;:\"']+@[^\s<>(),;:\"']+")
_MAILER_DAEMON = re.compile(r"\b(mailer-daemon|postmaster)@", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# a non-standard bounce sent to the VERP address; an auto-reply (out of office) is not one
_FAILURE_SUBJECT = re.compile(
    r"undeliver|not delivered|delivery (status|failure|failed|notification)|returned mail|failure notice",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a DSN."""

    action: str  # failed, delayed, delivered, relayed, expanded (lower-case), or ""
    status: str  # the enhanced status, e.g. 5.1.1, or ""
    diagnostic: str  # Diagnostic-Code, one line, at most MAX_TEXT characters
    final_recipient: str  # the address, without its "rfc822;" type
    original_recipient: str


@dataclass(frozen=True)
class Report:
    """What one message says. ``delivery_ids``: candidates, most trusted first; ``addresses``:
    the recipient addresses it names (normalised); ``campaign_id``: the returned message's
    ``X-Campaign-Id``; ``token``: an unsubscribe's token as written, not yet checked."""

    report_id: str
    kind: str
    delivery_ids: tuple[str, ...] = ()
    recipients: tuple[RecipientStatus, ...] = ()
    feedback_type: str = ""
    addresses: tuple[str, ...] = ()
    campaign_id: str = ""
    problem: str = ""
    token: str = ""

    def worst(self) -> RecipientStatus | None:
        """The block that decides a DSN's outcome: the first failed, else delayed, else any."""
        for action in ("failed", "delayed"):
            for recipient in self.recipients:
                if recipient.action == action:
                    return recipient
        return self.recipients[0] if self.recipients else None


def parse_report(data: bytes, bounce_address: str | None = None) -> Report:
    """``data`` (one whole message) as a :class:`Report`; ``bounce_address`` is the VERP template
    (``TRIGGERS_BOUNCE_ADDRESS``), without which only the returned Message-ID names a delivery."""
    report_id = _fallback_id(data)
    try:
        message = message_from_bytes(bytes(data), policy=policy.compat32)
        report_id = _report_id(message) or report_id
        return _classify(message, report_id, bounce_address)
    except Exception as error:  # noqa: BLE001 - hostile bytes: whatever breaks, the message is moved aside
        return Report(report_id, "unparsed", problem=_one_line(f"{type(error).__name__}: {error}"))


def _fallback_id(data: object) -> str:
    raw = data if isinstance(data, bytes | bytearray) else repr(data).encode("utf-8", "replace")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _report_id(message: Message) -> str:
    value = _one_line(_header(message, "Message-ID"))
    return value if 3 <= len(value) <= 250 else ""


def _classify(message: Message, report_id: str, bounce_address: str | None) -> Report:
    """The kind of ``message`` and what it names (see the module's docstring)."""
    report = _find_report_part(message)
    verp_ids = _verp_ids(message, bounce_address)
    if report is not None:
        report_type = report.get_param("report-type")
        report_type = report_type.lower() if isinstance(report_type, str) else ""
        parts = _parts_of(report)
        returned = _returned_headers(parts)
        ids = _unique([*verp_ids, *_verp_ids(returned, bounce_address), *_message_id_ids(returned)])
        campaign = _one_line(_header(returned, "X-Campaign-Id")) if returned is not None else ""
        if report_type == "delivery-status" or _part_of_type(parts, "delivery-status") is not None:
            return _dsn(report_id, parts, ids, campaign)
        if report_type == "feedback-report" or _part_of_type(parts, "feedback-report") is not None:
            return _arf(report_id, parts, returned, ids, campaign, bounce_address)
    subject = _one_line(_header(message, "Subject"))
    unsubscribe = _UNSUBSCRIBE.search(subject)
    if unsubscribe and report is None:
        return Report(report_id, "unsubscribe", token=unsubscribe.group(1))
    from_daemon = _MAILER_DAEMON.search(_header(message, "From"))
    if from_daemon or (verp_ids and _FAILURE_SUBJECT.search(subject)):  # a read receipt (MDN) is other
        why = "a report we cannot read" if report is not None else "a bounce that is not an RFC 3464 report"
        return Report(report_id, "unparsed", delivery_ids=tuple(verp_ids), problem=why)
    return Report(report_id, "other")


def _dsn(report_id: str, parts: list[Message], ids: list[str], campaign: str) -> Report:
    status_part = _part_of_type(parts, "delivery-status")
    blocks = _field_blocks(status_part) if status_part is not None else []
    recipients = tuple(_recipient(block) for block in blocks[1:] if "action" in block)
    if not recipients:  # no per-message block: the first is a recipient's
        recipients = tuple(_recipient(b) for b in blocks[:1] if "action" in b)
    if not recipients:
        why = "no delivery-status part" if status_part is None else "no per-recipient Action in its status"
        return Report(report_id, "unparsed", delivery_ids=tuple(ids), campaign_id=campaign, problem=why)
    addresses = _unique(a for r in recipients for a in (r.final_recipient, r.original_recipient) if a)
    return Report(
        report_id,
        "dsn",
        delivery_ids=tuple(ids),
        recipients=recipients,
        addresses=tuple(addresses),
        campaign_id=campaign,
    )


def _arf(
    report_id: str,
    parts: list[Message],
    returned: Message | None,
    ids: list[str],
    campaign: str,
    bounce_address: str | None,
) -> Report:
    feedback_part = _part_of_type(parts, "feedback-report")
    blocks = _field_blocks(feedback_part) if feedback_part is not None else []
    fields = blocks[0] if blocks else {}
    if bounce_address:  # Original-Mail-From is our envelope sender: the VERP address
        found = delivery_id_pattern(bounce_address).findall(fields.get("original-mail-from", ""))
        ids = _unique([*found, *ids])
    feedback_type = _one_line(fields.get("feedback-type", "")).lower()
    if not feedback_type:
        why = "no feedback-report part" if feedback_part is None else "no Feedback-Type in its report"
        return Report(report_id, "unparsed", delivery_ids=tuple(ids), campaign_id=campaign, problem=why)
    named = [fields.get("original-rcpt-to", "")]
    if returned is not None:
        named.append(_header(returned, "To"))
    addresses = _unique(a for text in named for a in _addresses_in(text))
    return Report(
        report_id,
        "arf",
        delivery_ids=tuple(ids),
        feedback_type=feedback_type[:40],
        addresses=tuple(addresses),
        campaign_id=campaign,
    )


# -- the parts of a report ----------------------------------------------------------------------
def _find_report_part(message: Message) -> Message | None:
    """The message's ``multipart/report``: itself, or one nested (a forwarder's wrapping)."""
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            return None
        if part.get_content_type() == "multipart/report":
            return part
    return None


def _parts_of(report: Message) -> list[Message]:
    payload = report.get_payload()
    return [p for p in payload[:MAX_PARTS] if isinstance(p, Message)] if isinstance(payload, list) else []


def _part_of_type(parts: list[Message], subtype: str) -> Message | None:
    """The part ``message/<subtype>`` (or ``text/``, ``message/global-``: some servers say so)."""
    wanted = {f"message/{subtype}", f"text/{subtype}", f"message/global-{subtype}"}
    return next((p for p in parts if p.get_content_type() in wanted), None)


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The blocks of ``Name: value`` fields of a status or feedback part, lower-case names."""
    payload = part.get_payload()
    if isinstance(payload, list):  # message/delivery-status: parsed into one Message per block
        return [_fields(block) for block in payload[:MAX_PARTS] if isinstance(block, Message)]
    text = _decoded_text(part)
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [_fields(HeaderParser(policy=policy.compat32).parsestr(b + "\n")) for b in blocks[:MAX_PARTS] if b]


def _fields(block: Message) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in block.items():
        found.setdefault(str(name).strip().lower(), _text(value))
    return found


def _recipient(block: dict[str, str]) -> RecipientStatus:
    status = re.search(r"[245]\.\d{1,3}\.\d{1,3}", block.get("status", ""))
    return RecipientStatus(
        action=_one_line(block.get("action", "")).lower()[:20],
        status=status.group(0) if status else "",
        diagnostic=_one_line(block.get("diagnostic-code", "")),
        final_recipient=_typed_address(block.get("final-recipient", "")),
        original_recipient=_typed_address(block.get("original-recipient", "")),
    )


def _returned_headers(parts: list[Message]) -> Message | None:
    """The headers of the returned message (``message/rfc822`` or ``text/rfc822-headers``)."""
    for part in parts:
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if kind in ("text/rfc822-headers", "message/global-headers", "message/rfc822-headers"):
            return HeaderParser(policy=policy.compat32).parsestr(_decoded_text(part))
    return None


# -- where a delivery or an address is named ---------------------------------------------------
def _verp_ids(message: Message | None, bounce_address: str | None) -> list[str]:
    if message is None or not bounce_address:
        return []
    pattern = delivery_id_pattern(bounce_address)
    values = (v for name in _ENVELOPE_HEADERS for v in (message.get_all(name) or [])[:20])
    return _unique(m.group(1) for value in values for m in pattern.finditer(_text(value)))


def _message_id_ids(returned: Message | None) -> list[str]:
    if returned is None:
        return []
    match = _MESSAGE_ID_LOCAL.search(_header(returned, "Message-ID"))
    return [match.group(1)] if match else []


def _typed_address(value: str) -> str:
    """``rfc822; Ann@Example.org`` -> ``Ann@example.org``; "" when it is not one address."""
    _, _, address = _one_line(value).rpartition(";")
    found = _addresses_in(address)
    return found[0] if found else ""


def _addresses_in(text: str) -> list[str]:
    out = []
    for candidate in _ADDRESS.findall(text or "")[:20]:
        try:
            out.append(normalize_email(candidate.strip(".")))
        except InvalidEmailError:
            continue
    return out


# -- text --------------------------------------------------------------------------------------
def _header(message: Message | None, name: str) -> str:
    return _text(message.get(name, "")) if message is not None else ""


def _text(value: object) -> str:
    """A header value as text, RFC 2047 words decoded where they can be."""
    text = str(value) if value is not None else ""
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # noqa: BLE001 - a broken encoded word stays as written
            pass
    return text


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""


def _one_line(value: str) -> str:
    return " ".join(_CONTROL.sub(" ", value).split())[:MAX_TEXT]


def _unique(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        if value:
            seen.setdefault(value, None)
    return list(seen)
