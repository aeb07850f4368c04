"""0001: the schema of the first release with migrations, on SQLite and PostgreSQL.

Every step is idempotent, so this revision also adopts a database made before migrations: the
tables and indexes missing are created, the indexes older versions made and no query uses are
dropped, and where the frontier triggers are missing they are created and the frontier is seeded
from the events still new. The DDL is written out here, frozen: it must not follow later changes
of ``schema.py``. The ``dim_*`` columns follow the configuration, not a revision (``db upgrade``).
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Connection, bindparam, text

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = {
    "pipeline_state": """consumer TEXT NOT NULL, position TEXT, pipeline_host TEXT, last_fetch_at FLOAT,
        events_received BIGINT NOT NULL, events_quarantined BIGINT NOT NULL, events_ignored BIGINT NOT NULL,
        events_duplicate BIGINT NOT NULL, requests_retried BIGINT NOT NULL, PRIMARY KEY (consumer)""",
    "recipients": """recipient_id TEXT NOT NULL, email TEXT, first_name TEXT, last_name TEXT, locale TEXT,
        shopper_id TEXT, mc_id TEXT, opted_out BOOLEAN NOT NULL, updated_at FLOAT,
        PRIMARY KEY (recipient_id), UNIQUE (shopper_id), UNIQUE (mc_id)""",
    "deliveries": """delivery_id TEXT NOT NULL, campaign_id TEXT NOT NULL, recipient_id TEXT, email TEXT,
        event_id TEXT NOT NULL, event_time FLOAT NOT NULL, decided_at FLOAT NOT NULL, status TEXT NOT NULL,
        reason TEXT, attempts INTEGER NOT NULL, claimed_at FLOAT, claimed_by TEXT, sent_at FLOAT,
        smtp_reply TEXT, PRIMARY KEY (delivery_id)""",
    "matching_frontier": """trigger_id TEXT NOT NULL, low_time FLOAT NOT NULL, version BIGINT NOT NULL,
        PRIMARY KEY (trigger_id)""",
    "pipeline_runs": """run_id TEXT NOT NULL, started_at FLOAT NOT NULL, finished_at FLOAT, counts TEXT,
        lag_seconds FLOAT, PRIMARY KEY (run_id)""",
    "pipeline_events": """event_id TEXT NOT NULL, position TEXT NOT NULL, consumer TEXT NOT NULL,
        trigger_id TEXT, time_gmt FLOAT, received_at FLOAT NOT NULL, status TEXT NOT NULL, reason TEXT,
        mc_id TEXT, processed_at FLOAT, payload TEXT NOT NULL, PRIMARY KEY (event_id)""",
}
# a page of pipeline_events keeps room for the new version of each of its rows (HOT updates)
EVENTS_FILLFACTOR = 50
INDEXES = {
    "ix_deliveries_next": "deliveries (status, decided_at, event_time, delivery_id)",
    "ix_deliveries_recipient_time": "deliveries (recipient_id, event_time)",
    "ix_pipeline_events_trigger_time": "pipeline_events (trigger_id, time_gmt)",
    "ix_pipeline_events_received": "pipeline_events (received_at)",
}
# made by versions before migrations; no query uses them, and the status index of pipeline_events
# made every status update rewrite all its indexes
DROPPED_INDEXES = (
    "ix_deliveries_campaign_recipient_time",
    "ix_deliveries_status",
    "ix_deliveries_due",
    "ix_pipeline_events_status_time",
)
COMMENTS = {  # PostgreSQL only (SQLite keeps none); SQL literals, quotes doubled
    "pipeline_state.position": "opaque journal position of the last staged event",
    "pipeline_state.last_fetch_at": "last successful journal request",
    "deliveries.event_time": "time_gmt of the triggering event",
    "deliveries.status": "pending, sending, sent, failed, suppressed",
    "matching_frontier.low_time": "no journal event of the trigger still new is older",
    "matching_frontier.version": "raised by every staging of the trigger''s new events",
    "pipeline_runs.counts": "JSON object: drained, quarantined, ignored, matched, ...",
    "pipeline_events.time_gmt": "trigger time, unix seconds",
    "pipeline_events.status": "new, ignored, quarantined, matched, unmatched",
    "pipeline_events.payload": "the raw event JSON",
}

FRONTIER_TRIGGERS = ("pipeline_events_frontier", "pipeline_events_frontier_requeued")
# lowers a trigger's frontier to its oldest new event and raises its version: on every insert of
# new events (staging, import, tests) and every update back to new (a requeue by hand)
LOWER_FRONTIER = """INSERT INTO matching_frontier (trigger_id, low_time, version) {rows}
    ON CONFLICT (trigger_id) DO UPDATE SET version = matching_frontier.version + 1,
        low_time = CASE WHEN excluded.low_time < matching_frontier.low_time
                        THEN excluded.low_time ELSE matching_frontier.low_time END"""
# staging quarantines an event without a trigger id; a row inserted by hand without one is never matched
NEW_PER_TRIGGER = (
    "SELECT trigger_id, min(time_gmt), 1 FROM {source} WHERE status = 'new' AND trigger_id IS NOT NULL "
    "GROUP BY trigger_id ORDER BY trigger_id"
)
NEW_ROW = "VALUES (NEW.trigger_id, NEW.time_gmt, 1)"
REQUEUED = "NEW.status = 'new' AND OLD.status <> 'new' AND NEW.trigger_id IS NOT NULL"
FRONTIER_DDL = {
    "postgresql": (
        # inserts: once per statement, over the rows it inserted (its transition table)
        f"""CREATE OR REPLACE FUNCTION pipeline_events_frontier() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {LOWER_FRONTIER.format(rows=NEW_PER_TRIGGER.format(source="staged"))}; RETURN NULL; END $$""",
        """CREATE OR REPLACE TRIGGER pipeline_events_frontier AFTER INSERT ON pipeline_events
        REFERENCING NEW TABLE AS staged FOR EACH STATEMENT EXECUTE FUNCTION pipeline_events_frontier()""",
        f"""CREATE OR REPLACE FUNCTION pipeline_events_frontier_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {LOWER_FRONTIER.format(rows=NEW_ROW)}; RETURN NULL; END $$""",
        f"""CREATE OR REPLACE TRIGGER pipeline_events_frontier_requeued AFTER UPDATE OF status ON pipeline_events
        FOR EACH ROW WHEN ({REQUEUED}) EXECUTE FUNCTION pipeline_events_frontier_row()""",
        f"ALTER TABLE pipeline_events SET (fillfactor = {EVENTS_FILLFACTOR})",
    ),
    "sqlite": (  # row triggers only
        f"""CREATE TRIGGER IF NOT EXISTS pipeline_events_frontier AFTER INSERT ON pipeline_events
        WHEN NEW.status = 'new' AND NEW.trigger_id IS NOT NULL BEGIN {LOWER_FRONTIER.format(rows=NEW_ROW)}; END""",
        f"""CREATE TRIGGER IF NOT EXISTS pipeline_events_frontier_requeued AFTER UPDATE OF status ON pipeline_events
        WHEN {REQUEUED} BEGIN {LOWER_FRONTIER.format(rows=NEW_ROW)}; END""",
    ),
}


def upgrade() -> None:
    conn = op.get_bind()
    postgres = conn.dialect.name == "postgresql"
    for name, columns in TABLES.items():
        storage = (
            f" WITH (fillfactor = {EVENTS_FILLFACTOR})" if postgres and name == "pipeline_events" else ""
        )
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} ({columns}){storage}")
    for name in DROPPED_INDEXES:
        conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{name}"')
    for name, on in INDEXES.items():
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")
    if postgres:
        for column, comment in COMMENTS.items():
            conn.exec_driver_sql(f"COMMENT ON COLUMN {column} IS '{comment}'")
    _frontier_triggers(conn)


def _frontier_triggers(conn: Connection) -> None:
    """Create the triggers that keep ``matching_frontier`` below every new event, unless both are
    there; the events staged before them (an older database) lower the frontier here."""
    if conn.dialect.name == "postgresql":
        existing = (
            "SELECT count(*) FROM pg_trigger WHERE tgname IN :names AND tgrelid = 'pipeline_events'::regclass"
        )
    else:
        existing = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN :names"
    query = text(existing).bindparams(bindparam("names", expanding=True))
    if conn.execute(query, {"names": list(FRONTIER_TRIGGERS)}).scalar_one() == len(FRONTIER_TRIGGERS):
        return
    for statement in FRONTIER_DDL[conn.dialect.name]:  # the triggers first: they lock out concurrent stagers
        conn.exec_driver_sql(statement)
    conn.exec_driver_sql(LOWER_FRONTIER.format(rows=NEW_PER_TRIGGER.format(source="pipeline_events")))


def downgrade() -> None:
    conn = op.get_bind()
    for name in reversed(TABLES):  # a table's triggers go with it
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "DROP FUNCTION IF EXISTS pipeline_events_frontier(), pipeline_events_frontier_row()"
        )
