"""The purge: staged events after ``pipeline.retention``, deliveries much later (SPEC section 8).

* **Staged events** older than ``pipeline.retention`` (default 3 days, as Campaign's purge)
  by their reception time are deleted — except those still ``new``: an event the pipeline
  has not processed yet is never lost to age. They are counted and logged instead, because an
  old waiting event means processing is stuck.
* **Deliveries** are the dedupe and frequency-cap memory, so they are kept for
  ``pipeline.delivery_retention`` (default 90 days) and never for less than the longest
  ``dedupe`` or ``limits.per_recipient.per`` window. Only finished ones (``sent``,
  ``failed``, ``suppressed``, ``bounced``) are deleted; ``pending`` and ``sending`` stay.
* **Run records** (``pipeline_runs``) are kept as long as deliveries.

Deletes go in bounded batches, one transaction each, so a large purge never holds long locks
nor a huge transaction, and an interrupted purge has still made progress.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, and_, delete, func, select

from include.config import TriggersConfig
from include.database.schema import deliveries, events_table, pipeline_runs

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 10_000
FINISHED_DELIVERY_STATUSES = ("sent", "failed", "suppressed", "bounced")


@dataclass(frozen=True)
class PurgeResult:
    events_deleted: int
    deliveries_deleted: int
    runs_deleted: int
    old_events_waiting: int  # 'new' events older than the retention, kept
    event_cutoff: float
    delivery_cutoff: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def delivery_retention(config: TriggersConfig) -> float:
    """Seconds to keep deliveries: the configured value, stretched to cover every rule's window."""
    windows = [config.pipeline.delivery_retention]
    windows += [campaign.dedupe for campaign in config.campaigns if campaign.dedupe]
    if config.limits.per_recipient:
        windows.append(config.limits.per_recipient.per)
    return max(windows)


def _delete_in_batches(engine: Engine, table: Any, key: Any, condition: Any, batch_size: int) -> int:
    """Delete the rows matching ``condition``, ``batch_size`` at a time; return how many."""
    deleted = 0
    while True:
        batch = select(key).where(condition).limit(batch_size)
        with engine.begin() as conn:
            count = conn.execute(delete(table).where(key.in_(batch))).rowcount
        deleted += count
        if count < batch_size:
            return deleted


def purge_events(
    engine: Engine,
    *,
    retention_seconds: float,
    now: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[int, int]:
    """Delete processed staged events received before ``now - retention_seconds``.

    Return (deleted, waiting): ``waiting`` counts the older events kept because still ``new``.
    """
    events = events_table()
    cutoff = (time.time() if now is None else now) - retention_seconds
    old = events.c.received_at < cutoff
    deleted = _delete_in_batches(
        engine, events, events.c.event_id, and_(old, events.c.status != "new"), batch_size
    )
    with engine.connect() as conn:
        waiting = conn.execute(select(func.count()).where(old, events.c.status == "new")).scalar_one()
    if waiting:
        log.warning(
            "%d staged events older than the retention are still waiting ('new'); kept, not purged. "
            "Check that triggers_pipeline runs and processes them.",
            waiting,
        )
    return deleted, int(waiting)


def purge_deliveries(
    engine: Engine,
    *,
    retention_seconds: float,
    now: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    """Delete finished deliveries whose event and decision are older than the retention."""
    cutoff = (time.time() if now is None else now) - retention_seconds
    finished_and_old = and_(
        deliveries.c.status.in_(FINISHED_DELIVERY_STATUSES),
        deliveries.c.event_time < cutoff,  # what dedupe and the frequency cap compare
        deliveries.c.decided_at < cutoff,
    )
    return _delete_in_batches(engine, deliveries, deliveries.c.delivery_id, finished_and_old, batch_size)


def purge_runs(
    engine: Engine,
    *,
    retention_seconds: float,
    now: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    cutoff = (time.time() if now is None else now) - retention_seconds
    return _delete_in_batches(
        engine, pipeline_runs, pipeline_runs.c.run_id, pipeline_runs.c.started_at < cutoff, batch_size
    )


def purge(
    engine: Engine, config: TriggersConfig, *, now: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> PurgeResult:
    """Apply every retention of ``config`` at ``now`` (unix seconds; a DAG passes its interval end)."""
    now = time.time() if now is None else float(now)
    keep_deliveries = delivery_retention(config)
    events_deleted, waiting = purge_events(
        engine, retention_seconds=config.pipeline.retention, now=now, batch_size=batch_size
    )
    deliveries_deleted = purge_deliveries(
        engine, retention_seconds=keep_deliveries, now=now, batch_size=batch_size
    )
    runs_deleted = purge_runs(engine, retention_seconds=keep_deliveries, now=now, batch_size=batch_size)
    result = PurgeResult(
        events_deleted=events_deleted,
        deliveries_deleted=deliveries_deleted,
        runs_deleted=runs_deleted,
        old_events_waiting=waiting,
        event_cutoff=now - config.pipeline.retention,
        delivery_cutoff=now - keep_deliveries,
    )
    log.info("purge: %s", result)
    return result


# ``python -m include.cli purge``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per delete transaction"
    )


def main(args: argparse.Namespace) -> int:
    import json

    from include.resources import open_resources

    with open_resources() as res:
        print(json.dumps(purge(res.engine, res.config, batch_size=args.batch_size).as_dict(), indent=2))
    return 0
