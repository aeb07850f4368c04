"""0002: the tables and columns of SPEC section 9 (sender obligations and control).

* ``suppressions``: addresses never to email, one row per (address, campaign); ``campaign_id`` is
  ``''`` for every campaign (a primary key column cannot be NULL); addresses are stored lower-case.
* ``triggers_secrets``: secrets the project generates once and keeps (the unsubscribe signing key
  when ``TRIGGERS_UNSUBSCRIBE_SECRET`` is unset).
* ``mailbox_reports``: each bounce or complaint report read from the mailbox, by its Message-ID, so
  that a report read twice changes nothing.
* ``recipients.timezone``: the IANA time zone of send windows.
* ``deliveries.not_before``: a pending email held until then (a closed send window).

Idempotent like 0001 (SQLite commits DDL as it goes, so a revision may be rerun).
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import inspect

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = {
    "suppressions": """email TEXT NOT NULL, campaign_id TEXT NOT NULL, reason TEXT NOT NULL, source TEXT,
        created_at FLOAT NOT NULL, PRIMARY KEY (email, campaign_id)""",
    "triggers_secrets": """name TEXT NOT NULL, value TEXT NOT NULL, created_at FLOAT NOT NULL,
        PRIMARY KEY (name)""",
    "mailbox_reports": """report_id TEXT NOT NULL, kind TEXT NOT NULL, delivery_id TEXT, email TEXT,
        outcome TEXT NOT NULL, detail TEXT, read_at FLOAT NOT NULL, PRIMARY KEY (report_id)""",
}
COLUMNS = {
    "recipients": {"timezone": "TEXT"},
    "deliveries": {"not_before": "FLOAT"},
}
COMMENTS = {  # PostgreSQL only
    "suppressions.email": "lower-case",
    "suppressions.source": "where it came from: a delivery id, a report, a file, a person",
    "mailbox_reports.report_id": "the report''s Message-ID (or a hash of it)",
    "mailbox_reports.kind": "dsn, arf, other",
    "suppressions.campaign_id": "empty: every campaign",
    "suppressions.reason": "unsubscribed, hard_bounce, complaint, manual",
    "recipients.timezone": "IANA name for send windows; empty: the configured default",
    "deliveries.not_before": "a pending email waits until then (send window)",
    "deliveries.status": "pending, sending, sent, failed, suppressed, bounced",
}


def upgrade() -> None:
    conn = op.get_bind()
    for name, columns in TABLES.items():
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
    inspector = inspect(conn)
    for table, columns in COLUMNS.items():
        existing = {c["name"] for c in inspector.get_columns(table)}
        for column, kind in columns.items():
            if column not in existing:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    if conn.dialect.name == "postgresql":
        for column, comment in COMMENTS.items():
            conn.exec_driver_sql(f"COMMENT ON COLUMN {column} IS '{comment}'")


def downgrade() -> None:
    conn = op.get_bind()
    for table, columns in COLUMNS.items():
        for column in columns:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    for name in reversed(TABLES):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
