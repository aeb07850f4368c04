"""What a mailbox report changes in the database, once: :func:`apply_report`.

=============  ===================================================================  =============
report         what changes                                                         outcome
=============  ===================================================================  =============
DSN, failed    the delivery ``bounced`` (reason: status and diagnostic); its        ``hard_bounce``
               address suppressed ``hard_bounce`` when the status says the address
               is bad (:mod:`~include.bounces.codes`) and the failed recipient is   or ``bounced``
               that address (not one it forwards to)
DSN, delayed   nothing (counted)                                                    ``delayed``
DSN, other     nothing (delivered, relayed, expanded)                               ``delivered``
ARF            the delivery's address suppressed ``complaint``; the delivery keeps  ``complaint``
               ``sent`` with reason ``complaint``
unsubscribe    the address of the delivery its signed token names suppressed        ``unsubscribed``
               ``unsubscribed`` (checked by the one-click link's ``check_token``)
=============  ===================================================================  =============

Every suppression here is for every campaign. A report is recorded in ``mailbox_reports`` (its
``report_id``) in the same transaction as its changes, so a report read again is a
``duplicate`` and changes nothing. A report we cannot act on changes nothing and is not
recorded (it is moved aside, and may be put back once fixed): ``unparsed``,
``unknown_delivery`` (it names no delivery we sent: a complaint too must name one, by our VERP
address or our Message-ID, since anyone can mail the bounce address a report naming any
address), ``invalid_token`` (an unsubscribe whose token is missing, altered or expired). A
report about a delivery still ``pending`` or ``sending`` is ``not_yet_recorded``: it changes
nothing and stays in the inbox, to be applied by a read after the send is recorded. ``other``
messages are not reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from include.bounces.codes import is_hard_status
from include.bounces.reports import MAX_TEXT, RecipientStatus, Report
from include.database.hourly import add_counts
from include.database.schema import mailbox_reports
from include.database.sql import in_list, insert_for, list_param
from include.errors import UnsubscribeTokenError
from include.suppressions.store import EVERY_CAMPAIGN, Suppression, add, address_key
from include.suppressions.unsubscribe import check_token, unsubscribe_secret

PROCESSED = frozenset(
    {"hard_bounce", "bounced", "delayed", "delivered", "complaint", "unsubscribed", "duplicate"}
)
SET_ASIDE = frozenset({"unparsed", "unknown_delivery", "invalid_token"})
LEFT_ALONE = frozenset({"other"})
WAITING = frozenset({"not_yet_recorded"})  # left in the inbox, unflagged: read again next time
_SENT = ("sent", "bounced")
_NOT_YET_RECORDED = ("pending", "sending")


@dataclass(frozen=True)
class Applied:
    """What became of a report: ``outcome`` (see the module's table), and what it was about."""

    outcome: str
    delivery_id: str | None = None
    email: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class _Delivery:
    delivery_id: str
    email: str


def apply_report(engine: Engine, report: Report, now: float | None = None) -> Applied:
    """Record what ``report`` says, in one transaction; idempotent by ``report.report_id``."""
    if report.kind == "other":
        return Applied("other")
    if report.kind == "unparsed":
        return Applied("unparsed", detail=report.problem)
    stamp = time.time() if now is None else now
    secret = unsubscribe_secret(engine) if report.kind == "unsubscribe" else b""
    with engine.begin() as conn:
        if _already_read(conn, report.report_id):
            return Applied("duplicate", detail=report.report_id)
        if report.kind == "unsubscribe":
            try:  # the one check of the one-click link: a delivery id alone unsubscribes no one
                found = check_token(conn, secret, report.token, stamp)
            except UnsubscribeTokenError as error:
                return Applied("invalid_token", detail=str(error)[:MAX_TEXT])
            delivery: _Delivery | None = _Delivery(found.delivery_id, found.email)
        else:
            delivery, status = _delivery(conn, report.delivery_ids)
            if status in _NOT_YET_RECORDED:
                return Applied("not_yet_recorded", detail=_named(report))
        if delivery is None:
            return Applied("unknown_delivery", detail=_named(report))
        applied = _decide(report, delivery, delivery.email)
        if not _record(conn, report, applied, stamp):
            return Applied("duplicate", detail=report.report_id)  # another reader, just now
        _change(conn, report, applied, stamp)
    return applied


def _decide(report: Report, delivery: _Delivery, email: str) -> Applied:
    delivery_id = delivery.delivery_id
    if report.kind == "arf":
        return Applied("complaint", delivery_id, email, report.feedback_type)
    if report.kind == "unsubscribe":
        return Applied("unsubscribed", delivery_id, email, "mailto")
    worst = report.worst()
    assert worst is not None  # a dsn has a recipient block (reports.parse_report)
    detail = " ".join(p for p in (worst.status, worst.diagnostic) if p)[:MAX_TEXT]
    if worst.action == "failed":
        hard = is_hard_status(worst.status) and _about_address(worst, email)
        return Applied("hard_bounce" if hard else "bounced", delivery_id, email, detail)
    return Applied("delayed" if worst.action == "delayed" else "delivered", delivery_id, email, detail)


def _about_address(block: RecipientStatus, email: str) -> bool:
    """The failed recipient is the delivery's address (or the block names none): a copy our
    recipient forwarded elsewhere that bounces there says nothing about the address we mail."""
    named = {address_key(a) for a in (block.final_recipient, block.original_recipient) if a}
    return not named or address_key(email) in named


def _change(conn: Connection, report: Report, applied: Applied, now: float) -> None:
    reason = {"hard_bounce": "hard_bounce", "complaint": "complaint", "unsubscribed": "unsubscribed"}
    if applied.outcome in reason and applied.email:
        source = applied.delivery_id or f"report {report.report_id}"[:250]
        add(conn, [Suppression(applied.email, reason[applied.outcome], EVERY_CAMPAIGN, source)], now=now)
    if applied.delivery_id is None:
        return
    if applied.outcome in ("hard_bounce", "bounced"):
        bounced = conn.execute(
            text(
                "UPDATE deliveries SET status = 'bounced', reason = :reason "
                "WHERE delivery_id = :id AND status = 'sent' RETURNING campaign_id"
            ),
            {"id": applied.delivery_id, "reason": f"bounced: {applied.detail}"[:MAX_TEXT]},
        ).scalar_one_or_none()
        if bounced is not None:  # the status view's count (hourly_counts), in the same transaction
            add_counts(conn, now, {(bounced, "bounced"): 1})
    elif applied.outcome == "complaint":
        conn.execute(
            text("UPDATE deliveries SET reason = 'complaint' WHERE delivery_id = :id AND status = 'sent'"),
            {"id": applied.delivery_id},
        )


def _already_read(conn: Connection, report_id: str) -> bool:
    found = conn.execute(text("SELECT 1 FROM mailbox_reports WHERE report_id = :id"), {"id": report_id})
    return found.first() is not None


def _record(conn: Connection, report: Report, applied: Applied, now: float) -> bool:
    """The report's row; False when another reader recorded it first."""
    row = {
        "report_id": report.report_id,
        "kind": report.kind,
        "delivery_id": applied.delivery_id,
        "email": address_key(applied.email) if applied.email else None,
        "outcome": applied.outcome,
        "detail": applied.detail[:MAX_TEXT],
        "read_at": now,
    }
    statement = insert_for(conn)(mailbox_reports).on_conflict_do_nothing(index_elements=["report_id"])
    # RETURNING, not rowcount: the engine's PostgreSQL driver setup reports -1 for this insert
    return conn.execute(statement.returning(mailbox_reports.c.report_id), row).first() is not None


def _delivery(conn: Connection, candidates: tuple[str, ...]) -> tuple[_Delivery | None, str | None]:
    """The first of ``candidates`` that is a delivery we sent, with its address; else (None, the
    status of the first still being sent, if any: its report waits for the send's record)."""
    if not candidates:
        return None, None
    found = conn.execute(
        text(
            "SELECT d.delivery_id, COALESCE(d.email, r.email), d.status FROM deliveries d "
            "LEFT JOIN recipients r ON r.recipient_id = d.recipient_id "
            f"WHERE {in_list(conn, 'd.delivery_id', 'ids')}"
        ),
        {"ids": list_param(conn, candidates)},
    )
    rows = {delivery_id: (email, status) for delivery_id, email, status in found}
    for candidate in candidates:
        email, status = rows.get(candidate, (None, None))
        if status in _SENT and email:
            return _Delivery(candidate, email), status
    waiting = [rows[c][1] for c in candidates if c in rows and rows[c][1] in _NOT_YET_RECORDED]
    return None, waiting[0] if waiting else None


def _named(report: Report) -> str:
    """What the report named, for the log: its delivery ids and addresses."""
    named = [*report.delivery_ids[:3], *report.addresses[:3]]
    return ("names " + ", ".join(named) if named else "names no delivery and no address")[:MAX_TEXT]
