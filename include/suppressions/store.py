"""The ``suppressions`` table: the one place that writes and reads it.

An address is stored trimmed and lower-cased, so that ``Ann@Example.com`` and
``ann@example.com`` are one person; ``campaign_id`` is ``EVERY_CAMPAIGN`` (``''``) for a
suppression of every campaign. Adding is idempotent: the first suppression of an address for a
scope wins, a later one changes nothing (its reason and source stay those of the first).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, text

from include.database.schema import suppressions
from include.database.sql import bulk_write, in_list, list_param

EVERY_CAMPAIGN = ""
REASONS = ("unsubscribed", "hard_bounce", "complaint", "manual")
COLUMNS = ("email", "campaign_id", "reason", "source", "created_at")  # the table's, in CSV order


def address_key(email: str) -> str:
    """The form an address is stored and compared in."""
    return email.strip().lower()


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    campaign_id: str = EVERY_CAMPAIGN
    source: str | None = None
    created_at: float | None = None  # None: when it is added

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
            "created_at": stamp if item.created_at is None else item.created_at,
        }
        for item in items
    ]
    if not rows:
        return 0
    # plain SQL, one row per execute: SQLAlchemy's insert construct reports rowcount -1 on psycopg
    statement = text(
        f"INSERT INTO suppressions ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)}) "
        "ON CONFLICT (email, campaign_id) DO NOTHING"
    )
    return sum(conn.execute(statement, row).rowcount for row in rows)


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


def add_many(conn: Connection, items: Iterable[Suppression], now: float | None = None) -> int:
    """:func:`add` for a large list (an import): one bulk write (COPY on PostgreSQL) in the
    caller's transaction; the first of several items of one scope wins, as in :func:`add`."""
    stamp = time.time() if now is None else now
    rows: dict[tuple[str, str], tuple[str, str, str, str | None, float]] = {}
    for item in items:
        key = (address_key(item.email), item.campaign_id or EVERY_CAMPAIGN)
        if key not in rows:
            created = stamp if item.created_at is None else item.created_at
            rows[key] = (*key, item.reason, item.source, created)
    return bulk_write(conn, suppressions, COLUMNS, list(rows.values()), conflict="nothing")


def listed(
    conn: Connection,
    *,
    email: str | None = None,
    campaign_id: str | None = None,
    reason: str | None = None,
    limit: int | None = None,
) -> Iterator[Suppression]:
    """The suppressions (those of ``email``, of the scope ``campaign_id``, of ``reason`` when
    given), by address then scope, streamed: an export of millions holds only a part in memory."""
    conditions, params = [], {}
    for column, value in (("email", email), ("campaign_id", campaign_id), ("reason", reason)):
        if value is not None:
            conditions.append(f"{column} = :{column}")
            params[column] = address_key(value) if column == "email" else value
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    tail = f" LIMIT {int(limit)}" if limit is not None else ""
    sql = f"SELECT {', '.join(COLUMNS)} FROM suppressions{where} ORDER BY email, campaign_id{tail}"
    result = conn.execution_options(stream_results=True, yield_per=10_000).execute(text(sql), params)
    for email_key, campaign, why, source, created in result:
        yield Suppression(email_key, why, campaign, source, float(created))


def counts_by_reason(conn: Connection) -> dict[str, int]:
    """reason -> how many suppressions (every scope), largest first."""
    found = conn.execute(text("SELECT reason, count(*) FROM suppressions GROUP BY reason"))
    return dict(sorted(((r, int(n)) for r, n in found), key=lambda kv: (-kv[1], kv[0])))
