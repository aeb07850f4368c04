"""A run's counts and lag (SPEC section 8), stored in ``pipeline_runs`` for the status view."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Connection, Engine, text

from include.database.schema import pipeline_runs
from include.database.sql import insert_for
from include.staging.parser import IMPORTED_POSITION

StageCounts = dict[str, Any] | None  # None: the stage failed (or did not run) and left no counts


def run_counts(drained: StageCounts, matched: StageCounts, delivered: StageCounts) -> dict[str, Any]:
    """One flat dict: drained, quarantined, ignored, matched, suppressed by reason, sent, failed;
    ``failed_stages`` names the stages without counts (e.g. "drain" when the journal was down)."""
    stages = {"drain": drained, "match": matched, "deliver": delivered}
    failed = [name for name, part in stages.items() if part is None]
    drained, matched, delivered = drained or {}, matched or {}, delivered or {}
    counts: dict[str, Any] = {
        "drained": drained.get("received", 0),
        "staged": drained.get("staged", 0),
        "duplicates": drained.get("duplicates", 0),
        "quarantined": drained.get("quarantined", 0),
        "ignored": drained.get("ignored", 0),
        "retried_requests": drained.get("retries", 0),
    }
    for source in (matched, delivered):
        for key, value in source.items():
            if isinstance(value, (int, float)):
                counts[key] = counts.get(key, 0) + value
    if failed:
        counts["failed_stages"] = ", ".join(failed)
    return counts


def waiting_events(conn: Connection, consumer: str | None = None) -> tuple[int, float | None]:
    """How many journal events wait for matching, and when the oldest was received (None: none).

    Read per trigger from its frontier on (no index holds the status); imported events wait for
    their backfill and are not counted.
    """
    sql = (
        "SELECT count(*), min(e.received_at) FROM matching_frontier f JOIN pipeline_events e "
        "ON e.trigger_id = f.trigger_id AND e.time_gmt >= f.low_time "
        f"WHERE e.status = 'new' AND e.position <> '{IMPORTED_POSITION}'"
    )
    params = {}
    if consumer is not None:
        sql += " AND e.consumer = :consumer"
        params["consumer"] = consumer
    count, oldest = conn.execute(text(sql), params).one()
    return int(count), None if oldest is None else float(oldest)


def oldest_unprocessed_age(engine: Engine, now: float) -> float:
    """The lag: seconds since the oldest waiting journal event was received (0 when none)."""
    with engine.connect() as conn:
        _, oldest = waiting_events(conn)
    return round(max(0.0, now - oldest), 3) if oldest is not None else 0.0


def record_run(
    engine: Engine,
    run_id: str,
    drained: StageCounts,
    matched: StageCounts,
    delivered: StageCounts,
    *,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Store the run's counts and lag (rerunning the run replaces its row); return them."""
    now = time.time()
    counts = run_counts(drained, matched, delivered)
    counts["lag_seconds"] = oldest_unprocessed_age(engine, now)
    insert = insert_for(engine)
    values = {
        "run_id": run_id,
        "started_at": started_at or now,
        "finished_at": now,
        "counts": json.dumps(counts, sort_keys=True),
        "lag_seconds": counts["lag_seconds"],
    }
    statement = insert(pipeline_runs).values(**values)
    with engine.begin() as conn:
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=["run_id"], set_={k: statement.excluded[k] for k in values if k != "run_id"}
            )
        )
    return counts
