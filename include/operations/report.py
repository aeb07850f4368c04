"""A run's counts and lag (SPEC section 8), stored in ``pipeline_runs`` for the status view."""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from sqlalchemy import Engine, func, select

from include.database.schema import pipeline_runs
from include.database.sql import insert_for
from include.staging.backlog import waiting_events

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


def oldest_unprocessed_age(engine: Engine, now: float) -> float:
    """The lag: seconds since the oldest waiting journal event was received (0 when none)."""
    with engine.connect() as conn:
        _, oldest = waiting_events(conn)
    return round(max(0.0, now - oldest), 3) if oldest is not None else 0.0


class LagBefore(NamedTuple):
    """The recorded runs before one: the last one's lag and end, and when the runs above the
    threshold began (the first of the latest series above it; None when the last was not above)."""

    lag_seconds: float | None
    finished_at: float | None
    above_since: float | None


def lag_before(engine: Engine, run_id: str, max_lag: float) -> LagBefore | None:
    """What the runs recorded before ``run_id`` say about the lag (None: no run before)."""
    runs = pipeline_runs.c
    others = runs.run_id != run_id
    with engine.connect() as conn:
        last = conn.execute(
            select(runs.lag_seconds, runs.finished_at)
            .where(others)
            .order_by(runs.finished_at.desc())
            .limit(1)
        ).first()
        if last is None:
            return None
        if last.lag_seconds is None or last.lag_seconds <= max_lag:
            return LagBefore(last.lag_seconds, last.finished_at, None)
        last_below = conn.execute(
            select(func.max(runs.finished_at)).where(others, runs.lag_seconds <= max_lag)
        ).scalar()
        first_above = select(func.min(runs.finished_at)).where(others, runs.lag_seconds > max_lag)
        if last_below is not None:
            first_above = first_above.where(runs.finished_at > last_below)
        return LagBefore(last.lag_seconds, last.finished_at, conn.execute(first_above).scalar())


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
