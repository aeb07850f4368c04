"""Counts kept per hour (``hourly_counts``, schema 0003): what the status view reads.

Each writer adds its batch's counts with :func:`add_counts` in the transaction that writes what
they count, so a batch rolled back (a crash, a refused commit) is never counted, and one
committed is counted once. One statement per batch: the cost does not grow with the rows.
Counts that belong to no campaign (received, staged, quarantined...) have campaign ``''``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Integer, case, cast, func, select

from include.database.schema import hourly_counts

HOUR = 3600
NO_CAMPAIGN = ""
SUPPRESSED = "suppressed_"  # the names of suppressions: suppressed_<reason>

Counts = Mapping[tuple[str, str], int]  # (campaign_id, name) -> how many


def hour_of(at: float) -> float:
    """The unix time of the start of ``at``'s hour (UTC)."""
    return float(int(at // HOUR) * HOUR)


def add_counts(conn: Connection, at: float, counts: Counts) -> None:
    """Add ``counts`` to the rows of ``at``'s hour, in ``conn``'s transaction (one upsert).

    Rows go in key order: two writers adding to the same rows lock them in the same order
    (PostgreSQL), so they wait for each other instead of deadlocking.
    """
    hour = hour_of(at)
    rows = [
        {"hour": hour, "campaign_id": campaign, "name": name, "n": int(n)}
        for (campaign, name), n in sorted(counts.items())
        if n
    ]
    if rows:
        conn.exec_driver_sql(_upsert_sql(conn.dialect.name), rows)


@lru_cache(maxsize=4)
def _upsert_sql(dialect: str) -> str:
    """The upsert in the driver's style, built once: SQLAlchemy's compile of an insert costs
    ~0.3 ms, more than the statement itself on SQLite (the recorder commits every few messages)."""
    marks = ("%(hour)s", "%(campaign_id)s", "%(name)s", "%(n)s")
    if dialect != "postgresql":
        marks = (":hour", ":campaign_id", ":name", ":n")
    return (
        f"INSERT INTO hourly_counts (hour, campaign_id, name, n) VALUES ({', '.join(marks)}) "
        "ON CONFLICT (hour, campaign_id, name) DO UPDATE SET n = hourly_counts.n + excluded.n"
    )


def upsert_selected_sql(select_sql: str) -> str:
    """``INSERT INTO hourly_counts`` the rows of ``select_sql`` (hour, campaign_id, name, n),
    adding to existing ones: for counts the database itself reads (the recorder's, by campaign).
    ``WHERE true`` closes the SELECT: SQLite would otherwise read ``ON CONFLICT`` as a join's ON;
    the rows go in key order, as in :func:`add_counts`."""
    return (
        f"INSERT INTO hourly_counts (hour, campaign_id, name, n) SELECT * FROM ({select_sql}) AS counted "
        "WHERE true ORDER BY campaign_id, name "
        "ON CONFLICT (hour, campaign_id, name) DO UPDATE SET n = hourly_counts.n + excluded.n"
    )


def read_counts(conn: Connection, start: float, end: float) -> list[tuple[float, str, str, int]]:
    """Every (hour, campaign_id, name, n) of the hours from ``start`` to before ``end``."""
    c = hourly_counts.c
    rows = conn.execute(select(c.hour, c.campaign_id, c.name, c.n).where(c.hour >= start, c.hour < end))
    return [(float(hour), campaign, name, int(n)) for hour, campaign, name, n in rows]


def first_counted_hour(conn: Connection) -> float | None:
    """The earliest hour with a count (None: nothing counted yet)."""
    value: Any = conn.execute(select(func.min(hourly_counts.c.hour))).scalar_one_or_none()
    return None if value is None else float(value)


def hour_number(column: Any) -> Any:
    """``floor(column / 3600)`` in SQL, the same on SQLite and PostgreSQL.

    ``CAST(x AS INTEGER)`` truncates on SQLite but rounds on PostgreSQL; one step back where
    the cast overshot makes both a floor, with no dialect-specific function.
    """
    rounded = cast(column / HOUR, Integer)
    return rounded - case((rounded * HOUR > column, 1), else_=0)
