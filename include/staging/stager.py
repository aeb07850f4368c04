"""Staging: store a parsed page and advance the journal position in one transaction (SPEC section 7).

Idempotent on the event identity: a page staged twice (a retry, a replay, a crash between
commit and acknowledgement) writes each event once. A batch the database refuses is written row
by row, each refused row quarantined with the database's message, in the same transaction as the
position: the position moves only once every row of the page is accounted for. The position
moves by compare-and-set from the one this stager read, so two drains cannot both move it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import DBAPIError

from include.adobe.auth import without_credentials
from include.config import TriggersConfig
from include.database.hourly import NO_CAMPAIGN, add_counts
from include.database.schema import events_table, pipeline_state
from include.database.sql import bulk_write, insert_for
from include.errors import PositionMovedError
from include.staging.limits import storable
from include.staging.parser import EventParser, ParsedPage

log = logging.getLogger(__name__)

REFUSED_KEY_CHARS = 256  # a refused row's longer event_id is stored as its digest (an index may refuse it)


@dataclass
class StageResult:
    received: int
    staged: int
    quarantined: int
    ignored: int
    refused: int = 0  # rows the database refused, stored quarantined (counted in quarantined too)

    @property
    def duplicates(self) -> int:
        return self.received - self.staged


class Stager:
    """Writes pages of one consumer into ``pipeline_events`` and ``pipeline_state``."""

    def __init__(self, engine: Engine, config: TriggersConfig) -> None:
        self.engine = engine
        self.consumer = config.pipeline.consumer
        self.parser = EventParser(config)
        self.table = events_table(config.dimensions)
        self.read_position: str | None = None  # what the next stage expects to find stored

    def position(self) -> str | None:
        """The stored position (also what the next ``stage`` expects to find stored)."""
        with self.engine.connect() as conn:
            self.read_position = conn.execute(
                select(pipeline_state.c.position).where(pipeline_state.c.consumer == self.consumer)
            ).scalar_one_or_none()
        return self.read_position

    def stage(
        self, page: ParsedPage, *, pipeline_host: str | None, fetched_at: float, retries: int = 0
    ) -> StageResult:
        """Insert the page's events and move the position to its last one, atomically."""

        def advance(conn: Connection, staged: int, refused: int) -> None:
            self._advance(conn, page, staged, refused, pipeline_host, fetched_at, retries)

        staged, refused = self.store(page, advance)
        if page.last_position is not None:
            self.read_position = page.last_position
        return StageResult(page.count, staged, page.quarantined + refused, page.ignored, refused)

    def store(
        self, page: ParsedPage, then: Callable[[Connection, int, int], None] | None = None
    ) -> tuple[int, int]:
        """Insert the page's rows and call ``then(conn, staged, refused)`` in one transaction; if
        the database refuses the batch, again row by row. Returns (rows written, rows refused)."""
        try:
            with self.engine.begin() as conn:
                staged = bulk_write(conn, self.table, page.columns, page.rows())
                count_staged(conn, page, staged, 0)
                if then is not None:
                    then(conn, staged, 0)
            return staged, 0
        except Exception as error:
            if not refused_a_value(error):
                raise  # a lock, a lost connection, a full disk: the drain stops, the next run retries
            log.warning("the database refused a batch (%s); writing it row by row", _message(error))
        with self.engine.begin() as conn:
            staged, refused = self.write_rows(conn, page)
            count_staged(conn, page, staged, refused)
            if then is not None:
                then(conn, staged, refused)
        return staged, refused

    def write_rows(self, conn: Connection, page: ParsedPage) -> tuple[int, int]:
        """The page's rows one by one, each in a savepoint; a row the database refuses is stored
        quarantined with its message. Returns (rows written, rows refused)."""
        columns = page.columns
        if conn.dialect.name == "sqlite":  # pysqlite opens its transaction only before DML: a first
            # SAVEPOINT would open it instead, and its RELEASE commit before the position moves
            conn.exec_driver_sql("UPDATE pipeline_state SET position = position WHERE 0")
        staged = refused = 0
        for row in page.rows():
            try:
                with conn.begin_nested():
                    staged += bulk_write(conn, self.table, columns, [row])
            except Exception as error:
                if not refused_a_value(error):
                    raise
                with conn.begin_nested():  # refused again: the error stops the drain, nothing moves
                    staged += bulk_write(conn, self.table, columns, [_refused_row(columns, row, error)])
                refused += 1
        return staged, refused

    def _advance(
        self,
        conn: Connection,
        page: ParsedPage,
        staged: int,
        refused: int,
        host: str | None,
        fetched_at: float,
        retries: int,
    ) -> None:
        """Counters and the position, by compare-and-set from ``read_position``."""
        insert = insert_for(conn)
        values = {
            "consumer": self.consumer,
            "pipeline_host": without_credentials(host),  # never a user, password or query
            "last_fetch_at": fetched_at,
            "events_received": page.count,
            "events_quarantined": page.quarantined + refused,
            "events_ignored": page.ignored,
            "events_duplicate": page.count - staged,
            "requests_retried": retries,
        }
        if page.last_position is not None:
            values["position"] = page.last_position
        statement = insert(pipeline_state).values(**values)
        state = pipeline_state.c
        counters = (
            "events_received",
            "events_quarantined",
            "events_ignored",
            "events_duplicate",
            "requests_retried",
        )
        changes = {name: state[name] + statement.excluded[name] for name in counters}
        changes.update(
            {name: statement.excluded[name] for name in values if name not in counters and name != "consumer"}
        )
        unmoved = state.position.is_not_distinct_from(self.read_position)
        upsert = statement.on_conflict_do_update(index_elements=["consumer"], set_=changes, where=unmoved)
        # RETURNING, not rowcount: psycopg reports -1 for an upsert; no row back = not updated
        if conn.execute(upsert.returning(state.consumer)).first() is None:
            raise PositionMovedError(
                f"the stored journal position of consumer {self.consumer!r} is no longer "
                f"{self.read_position!r}, where this drain started: another drain moved it meanwhile. "
                "This drain's last batch was rolled back and nothing is lost; drains hold the 'drain' "
                "run lock, so the other one was not started by this version: run the drain again"
            )

    def reset_position(self) -> None:
        """Forget the position (410 with ``on_gone: restart_from_oldest``)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(pipeline_state).where(pipeline_state.c.consumer == self.consumer).values(position=None)
            )
        self.read_position = None


def count_staged(conn: Connection, page: ParsedPage, staged: int, refused: int) -> None:
    """The page's counts for the status view, in the transaction that stores it (hourly_counts)."""
    counts = {
        (NO_CAMPAIGN, "received"): page.count,
        (NO_CAMPAIGN, "staged"): staged,
        (NO_CAMPAIGN, "quarantined"): page.quarantined + refused,
        (NO_CAMPAIGN, "ignored"): page.ignored,
    }
    add_counts(conn, time.time(), counts)


# SQLSTATE classes of a refused value: data exception, integrity constraint, program limit
# (an index row too large); any other class (a lock, a lost connection, a full disk) is not the row's fault
_VALUE_SQLSTATE_CLASSES = ("22", "23", "54")


def refused_a_value(error: BaseException) -> bool:
    """Did the database (or the driver's encoding) refuse a value of the row, rather than fail
    for a reason a retry can cure? Only the former may quarantine an event."""
    cause = error.orig if isinstance(error, DBAPIError) else error
    sqlstate = getattr(cause, "sqlstate", None)  # psycopg
    if sqlstate:
        return str(sqlstate)[:2] in _VALUE_SQLSTATE_CLASSES
    if isinstance(cause, (UnicodeError, ValueError)):  # the driver could not encode a value
        return True
    # PEP 249's names, also for errors a driver raises itself (psycopg: NUL in text; sqlite3: a
    # value too big); "database is locked", I/O and disk-full errors are OperationalError
    return type(cause).__name__ in {"DataError", "IntegrityError"}


def _message(error: BaseException) -> str:
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return storable(lines[0][:300] if lines else type(error).__name__)


def _refused_row(columns: Sequence[str], row: Sequence[Any], error: BaseException) -> tuple[Any, ...]:
    """The row quarantined with the database's message: only its identity, position, times and
    payload are kept (any other value may be what was refused)."""
    values = dict(zip(columns, row, strict=True))
    event_id = storable(str(values["event_id"]))
    if len(event_id) > REFUSED_KEY_CHARS:
        event_id = "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()
    kept = {
        "event_id": event_id,
        "position": storable(str(values["position"]))[:REFUSED_KEY_CHARS],
        "consumer": values["consumer"],
        "received_at": values["received_at"],
        "status": "quarantined",
        "reason": f"refused by the database: {_message(error)}",
        "payload": storable(str(values["payload"])),
    }
    return tuple(kept.get(column) for column in columns)
