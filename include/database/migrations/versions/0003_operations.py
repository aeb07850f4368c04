"""0003: the tables of running it at scale (issues 15 and 16).

* ``hourly_counts``: counts kept per hour as events are staged and decided and emails recorded,
  so that the status view reads a few hundred rows whatever the size of the staged table.
  ``hour`` is the unix time of the hour's start; ``campaign_id`` is ``''`` for counts that belong
  to no campaign (received, staged, quarantined...); ``name`` is the count's name as the run
  report spells it (``staged``, ``decided``, ``sent``, ``suppressed_unsubscribed``...). Writers add
  to a row with an upsert (``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n``).
* ``rate_limits``: the send-rate limits shared by every delivery worker (SPEC section 4,
  ``limits.rate``): ``key`` is ``*`` for the overall limit and ``@<domain>`` for a domain's;
  ``next_at`` is the unix time of the next free slot. A worker reserves slots with one UPDATE.

Idempotent like 0001 (SQLite commits DDL as it goes, so a revision may be rerun).
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = {
    "hourly_counts": """hour FLOAT NOT NULL, campaign_id TEXT NOT NULL, name TEXT NOT NULL,
        n BIGINT NOT NULL, PRIMARY KEY (hour, campaign_id, name)""",
    "rate_limits": "key TEXT NOT NULL, next_at FLOAT NOT NULL, PRIMARY KEY (key)",
}
COMMENTS = {  # PostgreSQL only
    "hourly_counts.hour": "unix time of the hour''s start",
    "hourly_counts.campaign_id": "empty: no campaign (received, staged, quarantined...)",
    "rate_limits.key": "* overall, @domain per recipient domain",
    "rate_limits.next_at": "unix time of the next free sending slot",
}


def upgrade() -> None:
    conn = op.get_bind()
    for name, columns in TABLES.items():
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
    if conn.dialect.name == "postgresql":
        for column, comment in COMMENTS.items():
            conn.exec_driver_sql(f"COMMENT ON COLUMN {column} IS '{comment}'")


def downgrade() -> None:
    conn = op.get_bind()
    for name in reversed(TABLES):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
