"""The ``suppressions`` table: the one place that writes and reads it.

An address is stored trimmed and lower-cased, so that ``Ann@Example.com`` and
``ann@example.com`` are one person; ``campaign_id`` is ``EVERY_CAMPAIGN`` (``''``) for a
suppression of every campaign. Adding is idempotent: the first suppression of an address for a
scope wins, a later one changes nothing (its reason and source stay those of the first).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, text

from include.database.schema import suppressions
from include.database.sql import in_list, insert_for, list_param

EVERY_CAMPAIGN = ""
REASONS = ("unsubscribed", "hard_bounce", "complaint", "manual")


def address_key(email: str) -> str:
    """The form an address is stored and compared in."""
    return email.strip().lower()


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    campaign_id: str = EVERY_CAMPAIGN
    source: str | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"suppression reason {self.reason!r} is not one of {', '.join(REASONS)}")


def add(conn: Connection, items: Iterable[Suppression], now: float | None = None) -> int:
    """Record ``items`` in the caller's transaction; return how many were new."""
    stamp = time.time() if now is None else now
    rows = [
        {
            "email": address_key(item.email),
            "campaign_id": item.campaign_id or EVERY_CAMPAIGN,
            "reason": item.reason,
            "source": item.source,
            "created_at": stamp,
        }
        for item in items
    ]
    if not rows:
        return 0
    statement = insert_for(conn)(suppressions).on_conflict_do_nothing(index_elements=["email", "campaign_id"])
    return sum(conn.execute(statement, [row]).rowcount for row in rows)


def remove(conn: Connection, email: str, campaign_id: str = EVERY_CAMPAIGN) -> int:
    """Delete one suppression (the only way one is undone); return 1 if it existed, else 0."""
    result = conn.execute(
        text("DELETE FROM suppressions WHERE email = :email AND campaign_id = :campaign"),
        {"email": address_key(email), "campaign": campaign_id or EVERY_CAMPAIGN},
    )
    return result.rowcount


def reasons_for(conn: Connection, emails: Iterable[str]) -> dict[tuple[str, str], str]:
    """``(address key, campaign_id)`` -> reason, for the suppressions of ``emails`` (any scope).

    One query whatever the number of addresses (the list is bound as one parameter).
    """
    keys = sorted({address_key(e) for e in emails if isinstance(e, str) and e.strip()})
    if not keys:
        return {}
    found = conn.execute(
        text(f"SELECT email, campaign_id, reason FROM suppressions WHERE {in_list(conn, 'email', 'emails')}"),
        {"emails": list_param(conn, keys)},
    )
    return {(email, campaign): reason for email, campaign, reason in found}


def suppressed_reason(found: dict[tuple[str, str], str], email: str, campaign_id: str) -> str | None:
    """The reason ``email`` may not receive ``campaign_id`` (every-campaign first), else None."""
    key = address_key(email)
    return found.get((key, EVERY_CAMPAIGN)) or found.get((key, campaign_id))
