"""The one-time count of the hours before counting began (``status --rollup``).

The writers keep ``hourly_counts`` from schema 0003 on; a database upgraded with events already
staged and emails already recorded has no counts for those hours, and the status view says so
(``counting_since``). This reads them back once from the rows still there, for every hour before
the first counted one: events by hour of reception (still staged: the purge keeps 3 days) and of
processing, decisions by hour of decision, emails sent by hour of sending, failures by hour of
the last attempt. The hour counting began in stays as the writers counted it (partly).
Rerunning it adds nothing: the hours it fills are before the first counted one from then on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select

from include.database.hourly import HOUR, NO_CAMPAIGN, SUPPRESSED, first_counted_hour, hour_number, hour_of
from include.database.schema import deliveries, events_table, hourly_counts, suppressions
from include.database.sql import bulk_write

Counted = dict[tuple[float, str, str], int]  # (hour, campaign_id, name) -> n


def roll_up_uncounted_hours(engine: Engine, consumer: str, now: float | None = None) -> int:
    """Count the hours before the first counted one (or before ``now``'s hour when none is);
    return the rows written to ``hourly_counts``."""
    with engine.begin() as conn:
        end = first_counted_hour(conn) or hour_of(time.time() if now is None else now)
        counted: Counted = defaultdict(int)
        _events(conn, consumer, end, counted)
        _decisions(conn, end, counted)
        _emails(conn, end, counted)
        rows = [(hour, campaign, name, n) for (hour, campaign, name), n in sorted(counted.items()) if n]
        return bulk_write(conn, hourly_counts, ["hour", "campaign_id", "name", "n"], rows)


def _events(conn: Connection, consumer: str, end: float, counted: Counted) -> None:
    events = events_table()
    c = events.c
    received = hour_number(c.received_at)
    for hour, status, n in conn.execute(
        select(received, c.status, func.count())
        .where(c.consumer == consumer, c.received_at < end)
        .group_by(received, c.status)
    ):
        for name in ("received", "staged", *([status] if status in ("quarantined", "ignored") else [])):
            counted[(float(int(hour) * HOUR), NO_CAMPAIGN, name)] += int(n)
    processed = hour_number(c.processed_at)
    for hour, status, n, seconds in conn.execute(
        select(processed, c.status, func.count(), func.sum(c.processed_at - c.received_at))
        .where(c.consumer == consumer, c.processed_at < end, c.status.in_(("matched", "unmatched")))
        .group_by(processed, c.status)
    ):
        at = float(int(hour) * HOUR)
        counted[(at, NO_CAMPAIGN, status)] += int(n)
        counted[(at, NO_CAMPAIGN, "processed")] += int(n)
        counted[(at, NO_CAMPAIGN, "processing_ms")] += int(round(float(seconds or 0) * 1000))


def _decisions(conn: Connection, end: float, counted: Counted) -> None:
    c = deliveries.c
    decided = hour_number(c.decided_at)
    for hour, campaign, status, reason, n in conn.execute(
        select(decided, c.campaign_id, c.status, c.reason, func.count())
        .where(c.decided_at < end)
        .group_by(decided, c.campaign_id, c.status, c.reason)
    ):
        at = float(int(hour) * HOUR)
        counted[(at, campaign, "decided")] += int(n)
        if status == "suppressed":
            counted[(at, campaign, f"{SUPPRESSED}{reason or 'unspecified'}")] += int(n)


_hard_bounce_sources = select(suppressions.c.source).where(suppressions.c.reason == "hard_bounce")


def _emails(conn: Connection, end: float, counted: Counted) -> None:
    c = deliveries.c
    outcomes: list[tuple[str, Any, Any]] = [
        ("sent", c.sent_at, c.status.in_(("sent", "bounced"))),
        ("bounced", c.sent_at, c.status == "bounced"),
        ("failed", c.claimed_at, c.status == "failed"),
        # a hard bounce at send time: failed, and its address suppressed with the delivery as source
        ("bounced", c.claimed_at, and_(c.status == "failed", c.delivery_id.in_(_hard_bounce_sources))),
    ]
    for name, column, condition in outcomes:
        hour = hour_number(column)
        for number, campaign, n in conn.execute(
            select(hour, c.campaign_id, func.count())
            .where(and_(condition, column < end))
            .group_by(hour, c.campaign_id)
        ):
            counted[(float(int(number) * HOUR), campaign, name)] += int(n)
