"""Staging: store a parsed page and advance the journal position in one transaction (SPEC section 7).

Idempotent on the event identity: a page staged twice (a retry, a replay, a crash between
commit and acknowledgement) writes each event once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from include.config import Settings, TriggersConfig, load_config
from include.database.engine import make_engine
from include.database.schema import ensure_schema, pipeline_state
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
        self.table = ensure_schema(engine, config.dimensions)

    def position(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(pipeline_state.c.position).where(pipeline_state.c.consumer == self.consumer)
            ).scalar_one_or_none()

    def stage(self, page: ParsedPage, *, pipeline_host: str | None, fetched_at: float, retries: int = 0) -> StageResult:
        """Insert the page's events and move the position to its last one, atomically."""
        with self.engine.begin() as conn:
            staged = bulk_write(conn, self.table, page.columns, page.rows())
            self._advance(conn, page, staged, pipeline_host, fetched_at, retries)
        return StageResult(page.count, staged, page.quarantined, page.ignored)

    def _advance(self, conn, page: ParsedPage, staged: int, host: str | None, fetched_at: float, retries: int) -> None:
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
        counters = ("events_received", "events_quarantined", "events_ignored", "events_duplicate", "requests_retried")
        changes = {name: state[name] + statement.excluded[name] for name in counters}
        changes.update({name: statement.excluded[name] for name in values if name not in counters and name != "consumer"})
        conn.execute(statement.on_conflict_do_update(index_elements=["consumer"], set_=changes))

    def reset_position(self) -> None:
        """Forget the position (410 with ``on_gone: restart_from_oldest``)."""
        with self.engine.begin() as conn:
            conn.execute(update(pipeline_state).where(pipeline_state.c.consumer == self.consumer).values(position=None))


def import_export(engine: Engine, config: TriggersConfig, path: str, chunk_size: int = 5_000) -> dict[str, int]:
    """Stage the events of a JSON-lines export (one journal event per line), for a backfill.

    Idempotent like the drain: importing a file twice stores each event once. The journal
    position is left alone; the imported events carry the position ``import``, and only
    backfill runs (of the intervals their times fall in) process them.
    """
    from itertools import islice

    from include.staging.parser import IMPORTED_POSITION, read_export

    stager = Stager(engine, config)
    counts = {"lines": 0, "staged": 0, "quarantined": 0, "ignored": 0}
    with open(path, encoding="utf-8") as export:
        events = read_export(export)
        while chunk := list(islice(events, chunk_size)):
            page = stager.parser.parse_items([(IMPORTED_POSITION, event, raw) for _, event, raw in chunk], time.time())
            with engine.begin() as conn:
                counts["staged"] += bulk_write(conn, stager.table, page.columns, page.rows())
            counts["lines"] += page.count
            counts["quarantined"] += page.quarantined
            counts["ignored"] += page.ignored
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a JSON-lines export: one journal event (SPEC section 3) per line")


def main(args: argparse.Namespace) -> int:
    """``import PATH``: stage an export of past events, then backfill their range."""
    settings = Settings.from_env()
    config = load_config(settings.config_path, settings.templates_dir)
    counts = import_export(make_engine(settings.db_url), config, args.path)
    print(json.dumps(counts))
    return 0
