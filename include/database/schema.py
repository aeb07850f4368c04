"""The tables of the staging database (SPEC section 5), as the code queries them.

Times are unix seconds as double precision (``time_gmt``, ``received_at``, ``sent_at``...):
one representation on both databases and in pandas. The dimensions the configuration reads are
extracted at staging into ``dim_<name>`` columns of ``pipeline_events``, a dimension's values
joined by ``config.VALUE_SEPARATOR`` in hit order. The DDL that makes these tables is in
``migrations/`` (the frontier triggers, the fillfactor); a test checks that both agree.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, MetaData, Table, Text

from include.config import dimension_column

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
    Column("timezone", Text, comment="IANA name for send windows; empty: the configured default"),
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
    Column("status", Text, nullable=False, comment="pending, sending, sent, failed, suppressed, bounced"),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_at", Float),
    Column("claimed_by", Text),
    Column("sent_at", Float),
    Column("smtp_reply", Text),
    Column("not_before", Float, comment="a pending email waits until then (send window)"),
    # delivery's next batch, in order, without a sort; a run's decisions arrive in event time
    # order, so its rows append to the index instead of landing at random delivery ids (2x cheaper)
    Index("ix_deliveries_next", "status", "decided_at", "event_time", "delivery_id"),
    Index("ix_deliveries_recipient_time", "recipient_id", "event_time"),  # matching's history
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("email", Text, primary_key=True, comment="lower-case"),
    Column("campaign_id", Text, primary_key=True, comment="empty: every campaign"),
    Column("reason", Text, nullable=False, comment="unsubscribed, hard_bounce, complaint, manual"),
    Column("source", Text, comment="where it came from: a delivery id, a report, a file, a person"),
    Column("created_at", Float, nullable=False),
)

triggers_secrets = Table(
    "triggers_secrets",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

mailbox_reports = Table(
    "mailbox_reports",
    metadata,
    Column("report_id", Text, primary_key=True, comment="the report's Message-ID (or a hash of it)"),
    Column("kind", Text, nullable=False, comment="dsn, arf, other"),
    Column("delivery_id", Text),
    Column("email", Text),
    Column("outcome", Text, nullable=False),
    Column("detail", Text),
    Column("read_at", Float, nullable=False),
)

hourly_counts = Table(
    "hourly_counts",
    metadata,
    Column("hour", Float, primary_key=True, comment="unix time of the hour's start"),
    Column(
        "campaign_id", Text, primary_key=True, comment="empty: no campaign (received, staged, quarantined...)"
    ),
    Column("name", Text, primary_key=True),
    Column("n", BigInteger, nullable=False),
)

rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", Text, primary_key=True, comment="* overall, @domain per recipient domain"),
    Column("next_at", Float, nullable=False, comment="unix time of the next free sending slot"),
)

matching_frontier = Table(
    "matching_frontier",
    metadata,
    Column("trigger_id", Text, primary_key=True),
    Column("low_time", Float, nullable=False, comment="no journal event of the trigger still new is older"),
    Column(
        "version", BigInteger, nullable=False, comment="raised by every staging of the trigger's new events"
    ),
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
EVENT_INDEXES = (
    ("ix_pipeline_events_trigger_time", ("trigger_id", "time_gmt")),
    ("ix_pipeline_events_received", ("received_at",)),
)
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
