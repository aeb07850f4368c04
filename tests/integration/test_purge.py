"""The purge (include/operations/purge.py) on SQLite and PostgreSQL: what goes, what stays, in batches."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from include.config import parse_config
from include.database.schema import deliveries, events_table, pipeline_runs
from include.database.sql import bulk_write
from include.operations.purge import delivery_retention, purge
from tests.conftest import upgrade_schema

NOW = 1_767_225_600.0
DAY = 86400.0
CONFIG = """
pipeline:
  consumer: customer_dev
  topics: [{name: triggers, triggers: [{name: "*"}]}]
  retention: 3d
  delivery_retention: 30d
"""


def _events(engine: Engine, rows: list[tuple[str, str, float]]) -> None:
    table = upgrade_schema(engine)
    columns = ["event_id", "position", "consumer", "received_at", "status", "payload"]
    with engine.begin() as conn:
        bulk_write(
            conn, table, columns, [(eid, eid, "customer_dev", at, status, "{}") for eid, status, at in rows]
        )


def _deliveries(engine: Engine, rows: list[tuple[str, str, float]]) -> None:
    columns = ["delivery_id", "campaign_id", "event_id", "event_time", "decided_at", "status", "attempts"]
    with engine.begin() as conn:
        bulk_write(
            conn, deliveries, columns, [(did, "c", "e", at, at, status, 0) for did, status, at in rows]
        )


def _ids(engine: Engine, key) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(key)).scalars())


def test_purge_keeps_waiting_events_and_recent_rows(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(CONFIG)
    old, recent = NOW - 3 * DAY - 1, NOW - 3 * DAY + 1
    _events(
        engine,
        [
            ("old-matched", "matched", old),
            ("old-unmatched", "unmatched", old),
            ("old-ignored", "ignored", old),
            ("old-quarantined", "quarantined", old),
            ("old-new", "new", old),
            ("recent-matched", "matched", recent),
            ("recent-new", "new", recent),
        ],
    )
    ancient, kept = NOW - 30 * DAY - 1, NOW - 30 * DAY + 1
    _deliveries(
        engine,
        [
            ("d-sent", "sent", ancient),
            ("d-failed", "failed", ancient),
            ("d-suppressed", "suppressed", ancient),
            ("d-pending", "pending", ancient),
            ("d-sending", "sending", ancient),
            ("d-recent", "sent", kept),
        ],
    )
    with engine.begin() as conn:
        bulk_write(
            conn, pipeline_runs, ["run_id", "started_at"], [("run-old", ancient), ("run-recent", kept)]
        )

    with caplog.at_level(logging.WARNING, logger="include.operations.purge"):
        result = purge(engine, config, now=NOW, batch_size=2)

    assert (result.events_deleted, result.deliveries_deleted, result.runs_deleted) == (4, 3, 1)
    assert result.old_events_waiting == 1 and "still waiting" in caplog.text
    assert result.event_cutoff == NOW - 3 * DAY and result.delivery_cutoff == NOW - 30 * DAY
    events = events_table()
    assert _ids(engine, events.c.event_id) == {"old-new", "recent-matched", "recent-new"}
    assert _ids(engine, deliveries.c.delivery_id) == {"d-pending", "d-sending", "d-recent"}
    assert _ids(engine, pipeline_runs.c.run_id) == {"run-recent"}

    again = purge(engine, config, now=NOW, batch_size=2)  # idempotent
    assert (again.events_deleted, again.deliveries_deleted, again.runs_deleted) == (0, 0, 0)


def test_purge_deletes_in_bounded_batches(engine: Engine) -> None:
    config = parse_config(CONFIG)
    _events(engine, [(f"e{i:05d}", "matched", NOW - 4 * DAY - i) for i in range(2_500)])
    statements: list[str] = []
    from sqlalchemy import event

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM PIPELINE_EVENTS"):
            statements.append(statement)

    result = purge(engine, config, now=NOW, batch_size=1_000)
    assert result.events_deleted == 2_500
    assert len(statements) == 3  # 1,000 + 1,000 + 500
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events_table())).scalar_one() == 0


def test_purge_of_an_empty_database_does_nothing(engine: Engine) -> None:
    upgrade_schema(engine)
    result = purge(engine, parse_config(CONFIG), now=NOW)
    assert result.events_deleted == result.deliveries_deleted == result.old_events_waiting == 0


def test_delivery_retention_covers_every_window() -> None:
    config = parse_config(CONFIG)
    assert config.pipeline.delivery_retention == 30 * DAY
    assert delivery_retention(config) == 30 * DAY
    longer = parse_config(
        CONFIG.replace("30d", "1d")
        + """
campaigns:
  - {id: c, trigger: "*", identity: {field: mcId, column: mc_id}, dedupe: 10d, template: t, sender: a@b.c}
limits: {per_recipient: {max: 3, per: 5d}}
"""
    )
    assert delivery_retention(longer) == 10 * DAY  # never forget a delivery dedupe still reads
    assert (
        parse_config(CONFIG.replace("  delivery_retention: 30d\n", "")).pipeline.delivery_retention
        == 90 * DAY
    )
