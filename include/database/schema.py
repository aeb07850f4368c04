"""The staging database: the tables (SPEC section 5) and batched writes, on SQLite and PostgreSQL.

Times are unix seconds as double precision (``time_gmt``, ``received_at``, ``sent_at``...):
one representation on both databases and in pandas. The dimensions the configuration reads are
extracted at staging into ``dim_<name>`` columns of ``pipeline_events``, a dimension's values
joined by ``VALUE_SEPARATOR`` in hit order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    inspect,
    select,
    text,
    update,
)

from include.config import dimension_column

SQLITE_CACHE_KIB = 256 * 1024
COPY_PART_ROWS = 5_000  # rows per COPY on PostgreSQL
VALUE_SEPARATOR = "\x1f"  # ASCII unit separator: never in Analytics values; stripped if it were

metadata = MetaData()

pipeline_state = Table(
    "pipeline_state",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("position", Text, comment="opaque journal position of the last staged event"),
    Column("pipeline_host", Text),
    Column("last_fetch_at", Float, comment="last successful journal request"),
    Column("events_received", BigInteger, nullable=False, default=0),
    Column("events_quarantined", BigInteger, nullable=False, default=0),
    Column("events_ignored", BigInteger, nullable=False, default=0),
    Column("events_duplicate", BigInteger, nullable=False, default=0),
    Column("requests_retried", BigInteger, nullable=False, default=0),
)

recipients = Table(
    "recipients",
    metadata,
    Column("recipient_id", Text, primary_key=True),
    Column("email", Text),
    Column("first_name", Text),
    Column("last_name", Text),
    Column("locale", Text),
    Column("shopper_id", Text, unique=True),
    Column("mc_id", Text, unique=True),
    Column("opted_out", Boolean, nullable=False, default=False),
    Column("updated_at", Float),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("delivery_id", Text, primary_key=True),
    Column("campaign_id", Text, nullable=False),
    Column("recipient_id", Text),
    Column("email", Text),
    Column("event_id", Text, nullable=False),
    Column("event_time", Float, nullable=False, comment="time_gmt of the triggering event"),
    Column("decided_at", Float, nullable=False),
    Column("status", Text, nullable=False, comment="pending, sending, sent, failed, suppressed"),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_at", Float),
    Column("claimed_by", Text),
    Column("sent_at", Float),
    Column("smtp_reply", Text),
    # delivery's next batch, in order, without a sort; a run's decisions arrive in event time
    # order, so its rows append to the index instead of landing at random delivery ids (2x cheaper)
    Index("ix_deliveries_next", "status", "decided_at", "event_time", "delivery_id"),
    Index("ix_deliveries_recipient_time", "recipient_id", "event_time"),  # matching's history
)
# no query used the first; ix_deliveries_next covers what the second and third did; the status
# index of pipeline_events made every status update rewrite all its indexes (matching_frontier)
DROPPED_INDEXES = (
    "ix_deliveries_campaign_recipient_time", "ix_deliveries_status", "ix_deliveries_due", "ix_pipeline_events_status_time",
)

matching_frontier = Table(
    "matching_frontier",
    metadata,
    Column("trigger_id", Text, primary_key=True),
    Column("low_time", Float, nullable=False, comment="no journal event of the trigger still new is older"),
    Column("version", BigInteger, nullable=False, comment="raised by every staging of the trigger's new events"),
)

pipeline_runs = Table(
    "pipeline_runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("counts", Text, comment="JSON object: drained, quarantined, ignored, matched, ..."),
    Column("lag_seconds", Float),
)

EVENT_COLUMNS: tuple[Column[Any], ...] = (
    Column("event_id", Text, primary_key=True),
    Column("position", Text, nullable=False),
    Column("consumer", Text, nullable=False),
    Column("trigger_id", Text),
    Column("time_gmt", Float, comment="trigger time, unix seconds"),
    Column("received_at", Float, nullable=False),
    Column("status", Text, nullable=False, comment="new, ignored, quarantined, matched, unmatched"),
    Column("reason", Text),
    Column("mc_id", Text),
    Column("processed_at", Float),
    Column("payload", Text, nullable=False, comment="the raw event JSON"),
)
# no index holds status or processed_at: marking an event then rewrites only its row (a HOT
# update on PostgreSQL, in the room the fillfactor leaves), 3.5x cheaper than with a status index
EVENT_INDEXES = (("ix_pipeline_events_trigger_time", ("trigger_id", "time_gmt")), ("ix_pipeline_events_received", ("received_at",)))
EVENTS_FILLFACTOR = 50  # a page keeps room for the new version of each of its rows


@lru_cache(maxsize=16)
def events_table(dimensions: tuple[str, ...] = ()) -> Table:
    """``pipeline_events`` with one ``dim_*`` column per configured dimension."""
    table = Table(
        "pipeline_events",
        MetaData(),
        *(column._copy() for column in EVENT_COLUMNS),
        *(Column(dimension_column(name), Text) for name in dimensions),
        postgresql_with={"fillfactor": EVENTS_FILLFACTOR},
    )
    for name, columns in EVENT_INDEXES:
        Index(name, *(table.c[c] for c in columns))
    return table


def ensure_schema(engine: Engine, dimensions: Sequence[str] = ()) -> Table:
    """Create missing tables and ``dim_*`` columns; return the events table to write to.

    A dimension added to the configuration later gets its column here, filled from the stored
    payloads of the events still staged, in the same transaction.
    """
    table = events_table(tuple(dimensions))
    with engine.begin() as conn:
        metadata.create_all(conn)
        for name in DROPPED_INDEXES:
            conn.execute(text(f'DROP INDEX IF EXISTS "{name}"'))
        table.create(conn, checkfirst=True)
        for index in [*table.indexes, *(i for t in metadata.tables.values() for i in t.indexes)]:
            index.create(conn, checkfirst=True)  # an index added since the table was created
        _ensure_frontier_triggers(conn)
        existing = {c["name"] for c in inspect(conn).get_columns("pipeline_events")}
        added = [name for name in dimensions if dimension_column(name) not in existing]
        for name in added:
            conn.execute(text(f'ALTER TABLE pipeline_events ADD COLUMN "{dimension_column(name)}" TEXT'))
        if added:
            _fill_dimension_columns(conn, table, added)
    return table


FRONTIER_TRIGGERS = ("pipeline_events_frontier", "pipeline_events_frontier_requeued")
# lowers a trigger's frontier to its oldest new event and raises its version: on every insert of
# new events (staging, import, tests) and every update back to new (a requeue by hand)
_LOWER_FRONTIER = """INSERT INTO matching_frontier (trigger_id, low_time, version) {rows}
    ON CONFLICT (trigger_id) DO UPDATE SET version = matching_frontier.version + 1,
        low_time = CASE WHEN excluded.low_time < matching_frontier.low_time
                        THEN excluded.low_time ELSE matching_frontier.low_time END"""
# staging quarantines an event without a trigger id; a row inserted by hand without one is never matched
_NEW_PER_TRIGGER = (
    "SELECT trigger_id, min(time_gmt), 1 FROM {source} WHERE status = 'new' AND trigger_id IS NOT NULL "
    "GROUP BY trigger_id ORDER BY trigger_id"
)
_NEW_ROW = "VALUES (NEW.trigger_id, NEW.time_gmt, 1)"
_REQUEUED = "NEW.status = 'new' AND OLD.status <> 'new' AND NEW.trigger_id IS NOT NULL"
_FRONTIER_DDL = {
    "postgresql": (
        # inserts: once per statement, over the rows it inserted (its transition table)
        f"""CREATE OR REPLACE FUNCTION pipeline_events_frontier() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {_LOWER_FRONTIER.format(rows=_NEW_PER_TRIGGER.format(source="staged"))}; RETURN NULL; END $$""",
        """CREATE OR REPLACE TRIGGER pipeline_events_frontier AFTER INSERT ON pipeline_events
        REFERENCING NEW TABLE AS staged FOR EACH STATEMENT EXECUTE FUNCTION pipeline_events_frontier()""",
        f"""CREATE OR REPLACE FUNCTION pipeline_events_frontier_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {_LOWER_FRONTIER.format(rows=_NEW_ROW)}; RETURN NULL; END $$""",
        f"""CREATE OR REPLACE TRIGGER pipeline_events_frontier_requeued AFTER UPDATE OF status ON pipeline_events
        FOR EACH ROW WHEN ({_REQUEUED}) EXECUTE FUNCTION pipeline_events_frontier_row()""",
        f"ALTER TABLE pipeline_events SET (fillfactor = {EVENTS_FILLFACTOR})",
    ),
    "sqlite": (  # row triggers only
        f"""CREATE TRIGGER IF NOT EXISTS pipeline_events_frontier AFTER INSERT ON pipeline_events
        WHEN NEW.status = 'new' AND NEW.trigger_id IS NOT NULL BEGIN {_LOWER_FRONTIER.format(rows=_NEW_ROW)}; END""",
        f"""CREATE TRIGGER IF NOT EXISTS pipeline_events_frontier_requeued AFTER UPDATE OF status ON pipeline_events
        WHEN {_REQUEUED} BEGIN {_LOWER_FRONTIER.format(rows=_NEW_ROW)}; END""",
    ),
}


def _ensure_frontier_triggers(conn: Connection) -> None:
    """Create the triggers that keep ``matching_frontier`` below every new event, once; the
    events staged before them (an older database) lower the frontier here."""
    if conn.dialect.name == "postgresql":
        existing = "SELECT count(*) FROM pg_trigger WHERE tgname IN :names AND tgrelid = 'pipeline_events'::regclass"
    else:
        existing = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN :names"
    query = text(existing).bindparams(bindparam("names", expanding=True))
    if conn.execute(query, {"names": list(FRONTIER_TRIGGERS)}).scalar_one() == len(FRONTIER_TRIGGERS):
        return
    for statement in _FRONTIER_DDL[conn.dialect.name]:  # the triggers first: they lock out concurrent stagers
        conn.exec_driver_sql(statement)
    conn.exec_driver_sql(_LOWER_FRONTIER.format(rows=_NEW_PER_TRIGGER.format(source="pipeline_events")))


def _fill_dimension_columns(conn: Connection, table: Table, names: Sequence[str]) -> None:
    from include.staging.parser import dimension_columns_of  # events imports this module

    statement = (
        update(table)
        .where(table.c.event_id == bindparam("_event_id"))
        .values({dimension_column(name): bindparam(f"_{dimension_column(name)}") for name in names})
    )
    rows = conn.execute(select(table.c.event_id, table.c.payload).where(table.c.status != "quarantined"))
    while batch := rows.fetchmany(10_000):
        updates = []
        for event_id, payload in batch:
            values = dimension_columns_of(payload, names)
            if any(v is not None for v in values):
                updates.append({"_event_id": event_id, **{f"_{dimension_column(n)}": v for n, v in zip(names, values, strict=True)}})
        if updates:
            conn.execute(statement, updates)


