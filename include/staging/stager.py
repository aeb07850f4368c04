"""Staging: store a parsed page and advance the journal position in one transaction (SPEC section 7).

Idempotent on the event identity: a page staged twice (a retry, a replay, a crash between
commit and acknowledgement) writes each event once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from include.config import TriggersConfig
from include.database.schema import events_table, pipeline_state
from include.database.sql import bulk_write, insert_for
from include.staging.parser import EventParser, ParsedPage


@dataclass
class StageResult:
    received: int
    staged: int
    quarantined: int
    ignored: int

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

    def position(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(pipeline_state.c.position).where(pipeline_state.c.consumer == self.consumer)
            ).scalar_one_or_none()

    def stage(
        self, page: ParsedPage, *, pipeline_host: str | None, fetched_at: float, retries: int = 0
    ) -> StageResult:
        """Insert the page's events and move the position to its last one, atomically."""
        with self.engine.begin() as conn:
            staged = bulk_write(conn, self.table, page.columns, page.rows())
            self._advance(conn, page, staged, pipeline_host, fetched_at, retries)
        return StageResult(page.count, staged, page.quarantined, page.ignored)

    def _advance(
        self, conn, page: ParsedPage, staged: int, host: str | None, fetched_at: float, retries: int
    ) -> None:
        insert = insert_for(conn)
        values = {
            "consumer": self.consumer,
            "pipeline_host": host,
            "last_fetch_at": fetched_at,
            "events_received": page.count,
            "events_quarantined": page.quarantined,
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
        conn.execute(statement.on_conflict_do_update(index_elements=["consumer"], set_=changes))

    def reset_position(self) -> None:
        """Forget the position (410 with ``on_gone: restart_from_oldest``)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(pipeline_state).where(pipeline_state.c.consumer == self.consumer).values(position=None)
            )
