"""The status view's reading against the size of the staged table: counts per hour vs the scan.

    python -m bench.bench_status [--events 1000000] [--db sqlite|postgresql|both] [--repeat 5]

Stages N events received over the chart's three days (and one delivery for every ten), counts
their hours once (``status --rollup``, what the writers keep from schema 0003 on), then times,
each the median of ``--repeat`` readings:

* ``pipeline_status``, what a refresh of the view reads now (``hourly_counts``, the waiting
  events from the frontier on, pending emails from the status index);
* the two scans a refresh made before issue 15, the same SQL as then: the window's events
  grouped by hour and status, and every delivery grouped by status and reason.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, case, func, select, text

from bench.bench_ingest import create_schema
from include.database.hourly import HOUR, hour_of

CONSUMER = "customer_dev"
CHUNK = 50_000
PG_DATABASE = "status_bench"


def fresh_database(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'status.db'}"
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from bench.bench_ingest import PG_ADMIN_URL

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {PG_DATABASE}"))
    admin.dispose()
    return make_url(PG_ADMIN_URL).set(database=PG_DATABASE).render_as_string(hide_password=False)


def stage(engine: Engine, events: int, now: float) -> None:
    """``events`` rows received evenly over the last 72 hours, processed 1.5 s later (but the
    last minute's, still new); a delivery for every tenth; the matching frontier where a run
    leaves it."""
    from include.database.schema import deliveries, events_table
    from include.database.sql import bulk_write

    table = events_table()
    start = hour_of(now) - 71 * HOUR
    step = (now - start) / events
    statuses = ("matched", "unmatched", "matched", "ignored")
    columns = ["event_id", "position", "consumer", "trigger_id", "time_gmt", "received_at", "status"]
    columns += ["processed_at", "payload"]
    for first in range(0, events, CHUNK):
        rows, emails = [], []
        for i in range(first, min(first + CHUNK, events)):
            at = start + i * step
            status = "new" if at > now - 60 else statuses[i % 4]
            processed = None if status in ("new", "ignored") else at + 1.5
            rows.append((f"e{i}", f"p{i}", CONSUMER, "3e8a2ba7", at - 20, at, status, processed, "{}"))
            if i % 10 == 0 and status == "matched":
                emails.append((f"d{i}", "cart_abandonment", f"e{i}", at, at + 1.5, "sent", 1))
        with engine.begin() as conn:
            bulk_write(conn, table, columns, rows)
            bulk_write(
                conn,
                deliveries,
                ["delivery_id", "campaign_id", "event_id", "event_time", "decided_at", "status", "attempts"],
                emails,
            )
    with engine.begin() as conn:
        # where a matching run leaves the frontier: at the oldest event still new (the last minute's)
        conn.execute(text("UPDATE matching_frontier SET low_time = :low"), {"low": now - 60 - 20})
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))


def scan_before(engine: Engine, now: float) -> None:
    """The reading of a refresh before issue 15: the window's events, then every delivery."""
    from include.database.hourly import hour_number
    from include.database.schema import deliveries, events_table

    events = events_table()
    start = hour_of(now) - 71 * HOUR
    recent = events.c.processed_at >= now - 24 * HOUR
    hour = hour_number(events.c.received_at).label("hour")
    with engine.connect() as conn:
        conn.execute(
            select(
                hour,
                events.c.status,
                func.count(),
                func.sum(case((recent, events.c.processed_at - events.c.received_at), else_=0.0)),
                func.sum(case((recent, 1), else_=0)),
            )
            .where(events.c.consumer == CONSUMER, events.c.received_at >= start)
            .group_by(hour, events.c.status)
        ).all()
        conn.execute(
            select(deliveries.c.status, deliveries.c.reason, func.count()).group_by(
                deliveries.c.status, deliveries.c.reason
            )
        ).all()


def median_seconds(repeat: int, reading) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        reading()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(kind: str, events: int, repeat: int, workdir: Path) -> None:
    from include.database.engine import make_engine
    from include.operations.rollup import roll_up_uncounted_hours
    from include.operations.status import pipeline_status

    url = fresh_database(kind, workdir)
    create_schema(url)
    engine = make_engine(url)
    now = time.time()
    started = time.perf_counter()
    stage(engine, events, now)
    staged_in = time.perf_counter() - started
    rows = roll_up_uncounted_hours(engine, CONSUMER, now=now + HOUR)  # every hour, this one included
    status = pipeline_status(engine, CONSUMER, now=now)
    assert status["staged"]["total"] == events, status["staged"]
    after = median_seconds(repeat, lambda: pipeline_status(engine, CONSUMER, now=now))
    before = median_seconds(repeat, lambda: scan_before(engine, now))
    engine.dispose()
    print(
        f"{kind:<10} {events:>10,} staged ({staged_in:.0f} s to stage), {rows:,} hourly_counts rows: "
        f"a refresh reads in {after * 1000:.1f} ms (before: the scans {before:.2f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_status", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=5, help="readings timed; the median is printed")
    args = parser.parse_args()
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
        for kind in kinds:
            bench(kind, args.events, args.repeat, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
