"""Matching's reads: ready events and the frontier, recipients, live decisions, cancelling events.

Finding ready events: no index holds the status, so marking an event rewrites only its row.
``matching_frontier`` keeps per trigger a time before which none of its journal events is still
new: a database trigger lowers it (and raises its version) whenever new events are inserted; a
run that decided every ready event moves it up to where the trigger's hold ends, unless its
version moved meanwhile (an older event may have been staged unseen). A run reads one index
range per trigger from there, merged in time order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, text

from include.config import TriggersConfig, dimension_column
from include.database.sql import driver_sql, in_list, list_param, row_address
from include.matching.decisions import HISTORY_COLUMNS, WAITING, Audience, no_history
from include.matching.rules import (
    MC_ID,
    Rule,
    hold_of,
    identity_sources,
    latest_ready_time,
    person_columns,
    switched_off,
)
from include.matching.values import empty_frame, objects
from include.staging.parser import IMPORTED_POSITION

LIVE_STATUSES = ("pending", "sending", "sent", "bounced")  # bounced: it was sent all the same
STAGED_STATUSES = ("new", "matched", "unmatched")  # events that can cancel (not quarantined/ignored)


def read_frame(
    conn: Connection, sql: str, params: dict[str, Any], columns: Sequence[str], floats: Sequence[str] = ()
) -> pd.DataFrame:
    """Run ``sql`` (``:name`` parameters) on the DBAPI cursor: plain tuples, built column-wise.

    SQLAlchemy's row objects, and pandas' check of every value of a str column, cost more than
    the query itself at a million rows: text comes back as object columns.
    """
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(driver_sql(conn, sql), params)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    values = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return pd.DataFrame(
        {
            name: np.array(column, dtype=float) if name in floats else objects(column)
            for name, column in zip(columns, values, strict=True)
        },
        index=pd.RangeIndex(len(rows)),
    )


def quoted(column: str) -> str:
    return f'"{column}"'


# --- ready events and the frontier ------------------------------------------------------------


@dataclass(frozen=True)
class Frontier:
    """A trigger's row of ``matching_frontier``: none of its journal events older than
    ``low_time`` is still new; ``version`` rises whenever one of its events is staged."""

    trigger_id: str
    low_time: float
    version: int


def read_frontier(conn: Connection) -> list[Frontier]:
    rows = conn.execute(
        text("SELECT trigger_id, low_time, version FROM matching_frontier ORDER BY trigger_id")
    )
    return [Frontier(str(t), float(low), int(version)) for t, low, version in rows]


def advance_frontier(
    conn: Connection, rules: Sequence[Rule], frontier: Sequence[Frontier], now: float
) -> None:
    """After a run that decided every ready journal event: move each trigger's frontier to where
    its hold ends, unless an event of it was staged since the run read the frontier (its version
    moved: that event may be older and unseen)."""
    for row in frontier:
        if switched_off(rules, row.trigger_id):  # its events were not read: they wait
            continue
        low = latest_ready_time(now, hold_of(rules, row.trigger_id))
        if low > row.low_time:
            conn.execute(
                text(
                    "UPDATE matching_frontier SET low_time = :low WHERE trigger_id = :t AND version = :version"
                ),
                {"low": low, "t": row.trigger_id, "version": row.version},
            )


@dataclass(frozen=True)
class ReadySelection:
    """Which new events a run decides: those whose windows have closed at ``now``, from each
    trigger's ``frontier`` row on, or within ``interval`` = (start, end) for a backfill."""

    rules: Sequence[Rule]
    frontier: Sequence[Frontier]
    now: float
    interval: tuple[float, float] | None = None


def read_ready_events(
    conn: Connection,
    config: TriggersConfig,
    selection: ReadySelection,
    *,
    limit: int,
    after: tuple[float, str] | None = None,
) -> pd.DataFrame:
    """The next ``limit`` new events whose windows have closed, in (time, event id) order, after
    the (time, event id) ``after`` when given: a run's later batches do not wait for the commit
    of its earlier ones.

    One index range per trigger of the frontier: from its ``low_time`` (or the backfill's
    interval) to where its hold ends, merged in time order by the database.
    """
    columns = [
        "event_id",
        "trigger_id",
        "time_gmt",
        "received_at",  # the status view's processing time (hourly_counts)
        MC_ID,
        *(dimension_column(d) for d in config.dimensions),
    ]
    # byte order for ties on both databases, as Python compares. The row's physical address
    # (SQLite's rowid, PostgreSQL's ctid) lets the status update reach it without the key index.
    postgres = conn.dialect.name == "postgresql"
    row_key = row_address(conn)
    tie_order = 'event_id COLLATE "C"' if postgres else "event_id"
    params: dict[str, Any] = {"limit": limit}
    shared = ["status = 'new'"]
    if selection.interval is not None:
        shared += ["time_gmt >= :start", "time_gmt < :end"]
        params["start"], params["end"] = selection.interval
    else:  # imported events wait for the backfill of their interval
        shared.append(f"position <> '{IMPORTED_POSITION}'")
    if after is not None:
        shared.append(f"time_gmt >= :after_time AND (time_gmt > :after_time OR {tie_order} > :after_id)")
        params["after_time"], params["after_id"] = after
    selected = ", ".join([*map(quoted, columns), f"{row_key} AS row_key"])
    arms = _ready_arms(selection, selected, shared, params, postgres=postgres, tie_order=tie_order)
    if not arms:
        arms.append(f"SELECT {selected} FROM pipeline_events WHERE 1 = 0")
    ready = " UNION ALL ".join(arms)
    if postgres:  # its compound ORDER BY takes output columns only, not a collation
        ready = f"SELECT * FROM ({ready}) AS ready"
    sql = f"{ready} ORDER BY time_gmt, {tie_order} LIMIT :limit"
    return read_frame(conn, sql, params, [*columns, "row_key"], floats=("time_gmt", "received_at"))


def _ready_arms(
    selection: ReadySelection,
    selected: str,
    shared: list[str],
    params: dict[str, Any],
    *,
    postgres: bool,
    tie_order: str,
) -> list[str]:
    """One SELECT per trigger of the frontier, its parameters added to ``params``."""
    arms = []
    for number, row in enumerate(selection.frontier):
        if switched_off(selection.rules, row.trigger_id):  # its campaigns are all switched off
            continue
        hold = hold_of(selection.rules, row.trigger_id)
        params[f"t{number}"], params[f"until{number}"] = (
            row.trigger_id,
            latest_ready_time(selection.now, hold),
        )
        conditions = [f"trigger_id = :t{number}", f"time_gmt <= :until{number}"]
        if selection.interval is None:
            conditions.append(f"time_gmt >= :low{number}")
            params[f"low{number}"] = row.low_time
        arm = f"SELECT {selected} FROM pipeline_events WHERE {' AND '.join(conditions + shared)}"
        # PostgreSQL reads (and merges) the index ranges only when each is ordered and limited;
        # SQLite merges a compound's ranges itself, and would sort ordered subqueries again
        if postgres:
            arm = f"SELECT * FROM ({arm} ORDER BY time_gmt, {tie_order} LIMIT :limit) AS arm{number}"
        arms.append(arm)
    return arms


# --- recipients -------------------------------------------------------------------------------


def _recipient_columns(rules: Sequence[Rule]) -> list[str]:
    identities = [c for c in person_columns(rules) if c not in ("recipient_id", "email")]
    return ["recipient_id", "email", "opted_out", *identities]


def read_recipients(
    conn: Connection, lookups: dict[str, Iterable[str]], rules: Sequence[Rule]
) -> pd.DataFrame:
    """The recipients whose ``column`` is one of the values, for each column of ``lookups``."""
    columns = _recipient_columns(rules)
    selected = ", ".join(map(quoted, columns))
    parts = []
    for column, values in lookups.items():
        values = list({v for v in values if v})
        if values:
            sql = f"SELECT {selected} FROM recipients WHERE {in_list(conn, quoted(column), 'values')}"
            parts.append(read_frame(conn, sql, {"values": list_param(conn, values)}, columns))
    found = pd.concat(parts, ignore_index=True) if parts else empty_frame(columns)
    return found.drop_duplicates("recipient_id").reset_index(drop=True)


def read_all_recipients(conn: Connection, rules: Sequence[Rule]) -> pd.DataFrame:
    columns = _recipient_columns(rules)
    return read_frame(conn, f"SELECT {', '.join(map(quoted, columns))} FROM recipients", {}, columns)


class AudienceReader:
    """Finds a run's recipients: by lookups for small batches, by one full read for a backlog.

    Looking up a value costs a few times reading a row, so once a batch asks for more than
    1/``FULL_READ_FACTOR`` of the audience, the needed columns of every recipient are read once
    and kept for the rest of the run (at most ``FULL_READ_LIMIT`` recipients).
    """

    FULL_READ_FACTOR = 8
    FULL_READ_LIMIT = 5_000_000

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = rules
        self.size: int | None = None
        self.everyone: Audience | None = None

    def for_batch(self, conn: Connection, lookups: dict[str, set[str]]) -> Audience:
        if self.everyone is not None:
            return self.everyone
        wanted = sum(len(values) for values in lookups.values())
        if self.size is None:
            self.size = int(conn.execute(text("SELECT count(*) FROM recipients")).scalar_one())
        if wanted * self.FULL_READ_FACTOR >= self.size and self.size <= self.FULL_READ_LIMIT:
            self.everyone = Audience(read_all_recipients(conn, self.rules))
            return self.everyone
        return Audience(read_recipients(conn, lookups, self.rules))


# --- cancelling events and live decisions -----------------------------------------------------


def read_cancelling(
    conn: Connection, config: TriggersConfig, rules: Sequence[Rule], start: float, end: float
) -> pd.DataFrame:
    """Staged events of any ``unless`` trigger with ``start <= time_gmt <= end``, any status."""
    with_unless = [rule for rule in rules if rule.unless_label is not None]
    available = {MC_ID, *(dimension_column(d) for d in config.dimensions)}
    wanted = {source for source, _ in identity_sources(rules)} | {
        r.match_on for r in with_unless if r.match_on
    }
    columns = ["event_id", "trigger_id", "time_gmt", *sorted(wanted & available)]
    if not with_unless:
        return empty_frame(columns)
    params: dict[str, Any] = {"start": start, "end": end}
    statuses = ", ".join(f"'{s}'" for s in STAGED_STATUSES)
    conditions = [f"status IN ({statuses})", "time_gmt >= :start", "time_gmt <= :end"]
    if all(rule.unless_ids is not None for rule in with_unless):
        ids = sorted(set().union(*(rule.unless_ids or () for rule in with_unless)))
        if not ids:
            return empty_frame(columns)
        conditions.append(in_list(conn, "trigger_id", "triggers"))
        params["triggers"] = list_param(conn, ids)
    sql = f"SELECT {', '.join(map(quoted, columns))} FROM pipeline_events WHERE {' AND '.join(conditions)}"
    return read_frame(conn, sql, params, columns, floats=("time_gmt",))


def read_history(
    conn: Connection,
    recipient_ids: Iterable[str],
    start: float,
    end: float,
    not_decided_at: float | None = None,
    enabled: Collection[str] | None = None,
) -> pd.DataFrame:
    """Live decisions in ``deliveries`` for these recipients with start <= event_time <= end
    (except those taken at ``not_decided_at``: the current run's, which it keeps itself), each
    flagged ``waiting`` when it is a pending email of a campaign not in ``enabled`` (a switched-off
    or removed one: it counts toward no frequency cap; None: every campaign counts)."""
    ids = list(set(recipient_ids))
    if not ids:
        return no_history()
    statuses = ", ".join(f"'{s}'" for s in LIVE_STATUSES)
    params: dict[str, Any] = {"ids": list_param(conn, ids), "start": start, "end": end}
    sql = (
        f"SELECT {', '.join(HISTORY_COLUMNS)}, status FROM deliveries "
        f"WHERE {in_list(conn, 'recipient_id', 'ids')} "
        f"AND event_time >= :start AND event_time <= :end AND status IN ({statuses})"
    )
    if not_decided_at is not None:
        sql += " AND decided_at <> :not_decided_at"
        params["not_decided_at"] = not_decided_at
    found = read_frame(conn, sql, params, [*HISTORY_COLUMNS, "status"], floats=("event_time",))
    pending = (found["status"] == "pending").to_numpy(dtype=bool)
    other = ~found["campaign_id"].isin(list(enabled)).to_numpy(dtype=bool) if enabled is not None else False
    found[WAITING] = pending & other
    return found.drop(columns="status")
