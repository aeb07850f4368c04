"""The pipeline's status: what Campaign's ``/pipelined/status`` page answers (SPEC section 8).

One function, :func:`pipeline_status`, reads a handful of small queries and returns a plain
dict (JSON-ready) that the Airflow UI view (``plugins/triggers_status.py``) and the ``status``
command show. Three kinds of figures, labelled as such:

* counters in ``pipeline_state``: cumulative since the consumer first fetched (every event
  received, duplicates included, quarantined, ignored, duplicate, requests retried);
* counts per hour in ``hourly_counts``, kept by the writers as events are staged and decided
  and emails recorded (:mod:`include.database.hourly`): the chart, the window's totals, the
  average processing time and the per-campaign breakdown read a few hundred rows, whatever the
  size of the staged table;
* the present: events waiting for matching and the lag (from the matching frontier on), emails
  pending (the ``status`` index), the suppression list, the recent runs.

Hours before counting began (a database upgraded to 0003 with events staged before) show as
not counted: ``counting_since`` says from when, and ``status --rollup`` counts them once from
the rows still staged (:mod:`include.operations.rollup`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, Engine, func, inspect, select

from include.adobe.auth import without_credentials
from include.database.hourly import (
    HOUR,
    NO_CAMPAIGN,
    SUPPRESSED,
    first_counted_hour,
    hour_of,
    read_counts,
)
from include.database.schema import deliveries, pipeline_runs, pipeline_state
from include.staging.backlog import waiting_events
from include.suppressions.store import counts_by_reason

PROCESSED = ("matched", "unmatched")
EVENT_COUNTS = ("matched", "unmatched", "ignored", "quarantined")
EMAIL_COUNTS = ("sent", "failed", "bounced", "retried")
CAMPAIGN_COUNTS = ("decided", "sent", "suppressed", "failed", "bounced", "retried")
PROCESSING_WINDOW = 24 * 3600.0  # the average processing time is over the last day's events
RECENT_RUNS = 10
STATE_COUNTERS = {  # the status's name -> pipeline_state's counter
    "received": "events_received",
    "quarantined": "events_quarantined",
    "ignored": "events_ignored",
    "duplicate": "events_duplicate",
    "requests_retried": "requests_retried",
}


def pipeline_status(
    engine: Engine,
    consumer: str,
    *,
    now: float | None = None,
    days: int = 3,
    recent_runs: int = RECENT_RUNS,
) -> dict[str, Any]:
    """The consumer's status at ``now`` (unix seconds); zeros where nothing was counted yet."""
    now = time.time() if now is None else float(now)
    this_hour = hour_of(now)
    chart_start = this_hour - (days * 24 - 1) * HOUR  # ``days`` x 24 whole hours, this one last
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        state = _state(conn, consumer) if "pipeline_state" in tables else {}
        counted = "hourly_counts" in tables
        rows = read_counts(conn, chart_start, this_hour + HOUR) if counted else []
        counting_since = first_counted_hour(conn) if counted else None
        # an older database gets the frontier at `db upgrade` (revision 0001)
        waiting, oldest_waiting = (
            waiting_events(conn, consumer) if "matching_frontier" in tables else (0, None)
        )
        unsent = _unsent(conn) if "deliveries" in tables else {"pending": 0, "sending": 0}
        runs = _recent_runs(conn, recent_runs) if "pipeline_runs" in tables else []
        suppressed = counts_by_reason(conn) if "suppressions" in tables else {}
    window = _totals(rows, chart_start)
    last_day = _totals(rows, this_hour - 23 * HOUR)
    return {
        "consumer": consumer,
        "generated_at": now,
        "pipeline_host": without_credentials(
            state.get("pipeline_host")
        ),  # rows stored before it was stripped
        "position": state.get("position"),
        "last_fetch_at": state.get("last_fetch_at"),
        "events": {name: int(state.get(column) or 0) for name, column in STATE_COUNTERS.items()},
        "staged": {
            "since": chart_start,
            "total": window.get("staged", 0),
            "processed": sum(window.get(name, 0) for name in PROCESSED),
            "by_status": {name: window.get(name, 0) for name in EVENT_COUNTS},
        },
        "emails": {**unsent, **_emails(window)},
        "suppressions": {"total": sum(suppressed.values()), "by_reason": suppressed},
        "waiting": waiting,
        "lag_seconds": None if oldest_waiting is None else max(0.0, now - oldest_waiting),
        "avg_processing_seconds": (
            last_day["processing_ms"] / 1000 / last_day["processed"] if last_day.get("processed") else None
        ),
        "processing_window_seconds": PROCESSING_WINDOW,
        "events_per_hour": _per_hour(rows, chart_start, days),
        "by_campaign": {
            "last_hour": _by_campaign(rows, this_hour - HOUR),
            "last_day": _by_campaign(rows, this_hour - 23 * HOUR),
        },
        "counting_since": counting_since,
        "recent_runs": runs,
    }


def _state(conn: Connection, consumer: str) -> dict[str, Any]:
    row = conn.execute(select(pipeline_state).where(pipeline_state.c.consumer == consumer)).mappings().first()
    return dict(row) if row else {}


def _totals(rows: list[tuple[float, str, str, int]], since: float) -> dict[str, int]:
    """name -> the sum over every campaign of the hours from ``since`` on."""
    totals: dict[str, int] = defaultdict(int)
    for hour, _campaign, name, n in rows:
        if hour >= since:
            totals[name] += n
    return dict(totals)


def _emails(window: dict[str, int]) -> dict[str, Any]:
    reasons = {name[len(SUPPRESSED) :]: n for name, n in window.items() if name.startswith(SUPPRESSED)}
    return {
        **{name: window.get(name, 0) for name in EMAIL_COUNTS},
        "suppressed": sum(reasons.values()),
        "suppressed_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _per_hour(rows: list[tuple[float, str, str, int]], start: float, days: int) -> list[dict[str, float]]:
    """Events staged (new rows: duplicates not counted) per hour of the chart."""
    staged = {hour: n for hour, campaign, name, n in rows if name == "staged" and campaign == NO_CAMPAIGN}
    hours = (start + index * HOUR for index in range(days * 24))
    return [{"hour": hour, "events": staged.get(hour, 0)} for hour in hours]


def _by_campaign(rows: list[tuple[float, str, str, int]], since: float) -> dict[str, Any]:
    """Per campaign, from the hour starting at ``since``: decided, sent, suppressed (and by
    reason), failed, bounced, retried; busiest campaign first."""
    campaigns: dict[str, dict[str, Any]] = {}
    for hour, campaign, name, n in rows:
        if hour < since or campaign == NO_CAMPAIGN:
            continue
        counts = campaigns.setdefault(
            campaign, {**{key: 0 for key in CAMPAIGN_COUNTS}, "suppressed_by_reason": {}}
        )
        if name.startswith(SUPPRESSED):
            reason = name[len(SUPPRESSED) :]
            counts["suppressed_by_reason"][reason] = counts["suppressed_by_reason"].get(reason, 0) + n
            counts["suppressed"] += n
        elif name in counts:
            counts[name] += n
    ordered = sorted(campaigns.items(), key=lambda kv: (-kv[1]["decided"] - kv[1]["sent"], kv[0]))
    return {"since": since, "campaigns": dict(ordered)}


def _unsent(conn: Connection) -> dict[str, int]:
    """Emails pending and being sent now: a range of the ``status`` index, not a table scan."""
    found = dict(
        conn.execute(
            select(deliveries.c.status, func.count())
            .where(deliveries.c.status.in_(("pending", "sending")))
            .group_by(deliveries.c.status)
        ).all()
    )
    return {"pending": int(found.get("pending", 0)), "sending": int(found.get("sending", 0))}


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
        took = row["finished_at"] - row["started_at"] if row["finished_at"] is not None else None
        runs.append({**dict(row), "counts": counts, "took_seconds": took})
    return runs


# ``python -m include.cli status``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=3, help="hours of the events-per-hour series, in days")
    parser.add_argument(
        "--rollup",
        action="store_true",
        help="once, after upgrading to schema 0003: count the hours before counting began from the "
        "events still staged and the deliveries (hourly_counts), then show the status",
    )


def main(args: argparse.Namespace) -> int:
    from include.delivery.controls import waiting_by_campaign
    from include.resources import open_resources

    with open_resources() as res:
        if args.rollup:
            from include.operations.rollup import roll_up_uncounted_hours

            print(
                json.dumps({"rolled_up": roll_up_uncounted_hours(res.engine, res.config.pipeline.consumer)})
            )
        status = pipeline_status(res.engine, res.config.pipeline.consumer, days=args.days)
        with res.engine.connect() as conn:  # each campaign's state; removed ones with pending emails too
            status["campaigns"] = waiting_by_campaign(conn, res.config)
        print(json.dumps(status, indent=2))
    return 0
