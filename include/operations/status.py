"""The pipeline's status: what Campaign's ``/pipelined/status`` page answers (SPEC section 8).

One function, :func:`pipeline_status`, reads a handful of aggregate queries and returns a
plain dict (JSON-ready) that the Airflow UI view (``plugins/triggers_status.py``) and the
``status`` command show. Two kinds of figures, labelled as such:

* counters in ``pipeline_state`` — cumulative since the consumer first fetched: every event
  received (duplicates included), quarantined, ignored, duplicate, requests retried;
* counts over the events staged in the last ``days`` days (the chart's window; the default,
  3, is the purge's retention): by status, processed (matched + unmatched), per hour — one
  scan of that window — and, over every staged event, the journal events still waiting and
  the lag (imported events wait for their backfill and are not counted).

The chart counts distinct staged events per hour of **reception** (``received_at``), the
pipeline's throughput; ``time_gmt`` is the shopper's time and may be hours old on a replay.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import Connection, Engine, Integer, case, cast, func, inspect, select

from include.adobe.auth import without_credentials
from include.database.schema import deliveries, events_table, pipeline_runs, pipeline_state
from include.operations.report import waiting_events
from include.suppressions.store import counts_by_reason

EVENT_STATUSES = ("new", "matched", "unmatched", "ignored", "quarantined")
PROCESSED_STATUSES = ("matched", "unmatched")
DELIVERY_STATUSES = ("pending", "sending", "sent", "failed", "suppressed", "bounced")
PROCESSING_WINDOW = 24 * 3600.0  # the average processing time is over the last day's events
RECENT_RUNS = 10
HOUR = 3600


def pipeline_status(
    engine: Engine,
    consumer: str,
    *,
    now: float | None = None,
    days: int = 3,
    recent_runs: int = RECENT_RUNS,
) -> dict[str, Any]:
    """The consumer's status at ``now`` (unix seconds); zeros where nothing was staged yet."""
    now = time.time() if now is None else float(now)
    chart_start = (int(now) // HOUR - days * 24 + 1) * HOUR  # ``days`` x 24 whole hours, this one last
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        state = _state(conn, consumer) if "pipeline_state" in tables else {}
        has_events = "pipeline_events" in tables
        window = _window(conn, consumer, chart_start, now) if has_events else _window_empty()
        # an older database gets the frontier at `db upgrade` (revision 0001)
        waiting, oldest_waiting = (
            waiting_events(conn, consumer) if "matching_frontier" in tables else (0, None)
        )
        emails = _emails(conn) if "deliveries" in tables else _emails_empty()
        runs = _recent_runs(conn, recent_runs) if "pipeline_runs" in tables else []
        suppressed = counts_by_reason(conn) if "suppressions" in tables else {}
    by_status = window["by_status"]
    return {
        "consumer": consumer,
        "generated_at": now,
        "pipeline_host": without_credentials(
            state.get("pipeline_host")
        ),  # rows stored before it was stripped
        "position": state.get("position"),
        "last_fetch_at": state.get("last_fetch_at"),
        "events": {
            "received": int(state.get("events_received") or 0),
            "quarantined": int(state.get("events_quarantined") or 0),
            "ignored": int(state.get("events_ignored") or 0),
            "duplicate": int(state.get("events_duplicate") or 0),
            "requests_retried": int(state.get("requests_retried") or 0),
        },
        "staged": {
            "since": float(chart_start),
            "total": sum(by_status.values()),
            "processed": sum(by_status.get(s, 0) for s in PROCESSED_STATUSES),
            "by_status": by_status,
        },
        "emails": emails,
        "suppressions": {"total": sum(suppressed.values()), "by_reason": suppressed},
        "waiting": waiting,
        "lag_seconds": None if oldest_waiting is None else max(0.0, now - oldest_waiting),
        "avg_processing_seconds": window["avg_processing_seconds"],
        "processing_window_seconds": PROCESSING_WINDOW,
        "events_per_hour": [
            {"hour": float(hour), "events": window["per_hour"].get(hour // HOUR, 0)}
            for hour in range(chart_start, chart_start + days * 24 * HOUR, HOUR)
        ],
        "recent_runs": runs,
    }


def _state(conn: Connection, consumer: str) -> dict[str, Any]:
    row = conn.execute(select(pipeline_state).where(pipeline_state.c.consumer == consumer)).mappings().first()
    return dict(row) if row else {}


def _window_empty() -> dict[str, Any]:
    return {"by_status": {s: 0 for s in EVENT_STATUSES}, "per_hour": {}, "avg_processing_seconds": None}


def _window(conn: Connection, consumer: str, start: float, now: float) -> dict[str, Any]:
    """Per hour and status: counts and processing times of the window's events, in one scan."""
    events = events_table()
    hour = hour_number(events.c.received_at).label("hour")
    recent = events.c.processed_at >= now - PROCESSING_WINDOW
    rows = conn.execute(
        select(
            hour,
            events.c.status,
            func.count(),
            func.sum(case((recent, events.c.processed_at - events.c.received_at), else_=0.0)),
            func.sum(case((recent, 1), else_=0)),
        )
        .where(events.c.consumer == consumer, events.c.received_at >= start)
        .group_by(hour, events.c.status)
    ).all()
    result = _window_empty()
    total_seconds, processed_recently = 0.0, 0
    for hour, status, count, seconds, recent_count in rows:
        result["by_status"][status] = result["by_status"].get(status, 0) + int(count)
        result["per_hour"][int(hour)] = result["per_hour"].get(int(hour), 0) + int(count)
        total_seconds += float(seconds or 0.0)
        processed_recently += int(recent_count or 0)
    if processed_recently:
        result["avg_processing_seconds"] = total_seconds / processed_recently
    return result


def hour_number(column: Any) -> Any:
    """``floor(column / 3600)`` in SQL, the same on SQLite and PostgreSQL.

    ``CAST(x AS INTEGER)`` truncates on SQLite but rounds on PostgreSQL; one step back where
    the cast overshot makes both a floor, with no dialect-specific function.
    """
    rounded = cast(column / HOUR, Integer)
    return rounded - case((rounded * HOUR > column, 1), else_=0)


def _emails_empty() -> dict[str, Any]:
    return {**{s: 0 for s in DELIVERY_STATUSES}, "suppressed_by_reason": {}}


def _emails(conn: Connection) -> dict[str, Any]:
    rows = conn.execute(
        select(deliveries.c.status, deliveries.c.reason, func.count()).group_by(
            deliveries.c.status, deliveries.c.reason
        )
    ).all()
    result = _emails_empty()
    for status, reason, count in rows:
        result[status] = result.get(status, 0) + int(count)
        if status == "suppressed":
            key = reason or "unspecified"
            result["suppressed_by_reason"][key] = result["suppressed_by_reason"].get(key, 0) + int(count)
    result["suppressed_by_reason"] = dict(
        sorted(result["suppressed_by_reason"].items(), key=lambda kv: -kv[1])
    )
    return result


def _recent_runs(conn: Connection, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(pipeline_runs).order_by(pipeline_runs.c.started_at.desc()).limit(limit)
    ).mappings()
    runs = []
    for row in rows:
        try:
            counts = json.loads(row["counts"]) if row["counts"] else {}
        except ValueError:
            counts = {"unreadable": row["counts"]}
        runs.append({**dict(row), "counts": counts})
    return runs


# ``python -m include.cli status``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=3, help="hours of the events-per-hour series, in days")


def main(args: argparse.Namespace) -> int:
    from include.delivery.controls import waiting_by_campaign
    from include.resources import open_resources

    with open_resources() as res:
        status = pipeline_status(res.engine, res.config.pipeline.consumer, days=args.days)
        with res.engine.connect() as conn:  # each campaign's state; removed ones with pending emails too
            status["campaigns"] = waiting_by_campaign(conn, res.config)
        print(json.dumps(status, indent=2))
    return 0
