"""Matching at volume: N staged events against N recipients, end to end, on SQLite and PostgreSQL.

    python -m bench.bench_matching [--db sqlite|postgresql|both] [--events N] [--repeat K] [--suppressions N]

The events (cart 45 %, browse 40 %, purchase 15 %, over N people of whom 5 % are unknown) and
the recipients are written with db.bulk_write first (not timed). Then a fresh process runs
``match_ready_events`` with every window closed (reads, decisions and writes included) and
another process times a bare pandas merge of the same two frames; each reports its time and
its own peak RSS (with its writer process's on SQLite). Goal: 1,000,000 events in under 30 s
(over 33,000 events/s), peak RSS < 2 GiB.
PostgreSQL: TRIGGERS_BENCH_PG_URL (default the local server, user postgres).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from include.config import parse_config

PG_ADMIN_URL = os.environ.get("TRIGGERS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DATABASE = "triggers_bench_matching"
CART, BROWSE, PURCHASE = (
    "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf",
    "5c2d8e71-4b0a-4f3e-9d6c-1a7b8e9f0c21",
    "9b1f6a52-0c1e-4d5e-8a0e-5f2d7c3b9e40",
)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CONFIG = f"""
pipeline:
  consumer: bench
  topics:
    - name: triggers
      triggers:
        - {{name: {CART}, label: cart_abandonment}}
        - {{name: {BROWSE}, label: browse_abandonment}}
        - {{name: {PURCHASE}, label: purchase}}
campaigns:
  - id: cart_abandonment
    trigger: cart_abandonment
    identity: {{dimension: eVar01, column: shopper_id}}
    where: [{{dimension: pageName, op: startswith, value: checkout}}]
    unless: {{trigger: purchase, within: 30m, match_on: products}}
    dedupe: 24h
    template: cart_abandonment
    sender: "Shop <shop@example.com>"
  - id: browse_abandonment
    trigger: browse_abandonment
    identity: {{field: mcId, column: mc_id}}
    unless: {{trigger: purchase, within: 30m}}
    dedupe: 72h
    template: browse_abandonment
    sender: "Shop <shop@example.com>"
limits:
  per_recipient: {{max: 3, per: 24h}}
"""
EVENT_COLUMNS = [
    "event_id",
    "position",
    "consumer",
    "trigger_id",
    "time_gmt",
    "received_at",
    "status",
    "mc_id",
    "payload",
    "dim_evar01",
    "dim_pagename",
    "dim_products",
]
RECIPIENT_COLUMNS = ["recipient_id", "email", "first_name", "locale", "shopper_id", "mc_id", "opted_out"]


def make_frames(events: int, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The staged events and the recipients, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    people = events
    ids = np.arange(people)
    recipients = pd.DataFrame(
        {
            "recipient_id": pd.Series(ids).map("R{:08d}".format),
            "email": pd.Series(ids).map("user{:08d}@example.com".format),
            "first_name": "Ada",
            "locale": np.where(rng.random(people) < 0.2, "fr_FR", None),
            "shopper_id": pd.Series(ids).map("SHOP-{:08d}".format),
            "mc_id": pd.Series(ids).map("MC{:036d}".format),
            "opted_out": rng.random(people) < 0.02,
        }
    )
    broken = rng.random(people) < 0.01
    recipients.loc[broken, "email"] = recipients.loc[broken, "email"].str.replace("@", " at ", regex=False)

    person = pd.Series(rng.integers(0, int(people * 1.05), events))  # 5 % unknown to the audience
    kind = rng.choice(3, size=events, p=[0.45, 0.40, 0.15])
    times = np.sort(T0 + rng.random(events) * 86_400.0).round(3)
    sku = pd.Series(rng.integers(0, 5_000, events)).map("SKU-{}".format)
    second_sku = pd.Series(rng.integers(0, 5_000, events)).map("SKU-{}".format)
    sep = "\x1f"
    cart_page = np.where(rng.random(events) < 0.9, "checkout:cart", "product:detail")
    frame = pd.DataFrame(
        {
            "event_id": pd.Series(rng.permutation(events)).map("{:032x}".format),
            "position": pd.Series(np.arange(events)).astype(str),
            "consumer": "bench",
            "trigger_id": np.choose(kind, [CART, BROWSE, PURCHASE]),
            "time_gmt": times,
            "received_at": times + 5.0,
            "status": "new",
            "mc_id": person.map("MC{:036d}".format),
            "payload": "{}",
            "dim_evar01": np.where(kind == 1, "", "SHOP-" + person.map("{:08d}".format)),
            "dim_pagename": np.choose(
                kind, [cart_page, np.full(events, "product:detail"), np.full(events, "checkout:thanks")]
            ),
            "dim_products": np.where(rng.random(events) < 0.3, sku + sep + second_sku, sku),
        }
    )
    frame["dim_evar01"] = frame["dim_evar01"].replace("", None)
    return frame, recipients


def _fresh_database(kind: str, workdir: Path) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if kind == "sqlite":
        path = workdir / "matching.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{PG_DATABASE}"'))
    admin.dispose()
    return make_url(PG_ADMIN_URL).set(database=PG_DATABASE).render_as_string(hide_password=False)


def _drop_database(kind: str) -> None:
    if kind != "postgresql":
        return
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)'))
    admin.dispose()


def prepare(url: str, events: int, suppressions: int = 0) -> None:
    """Create the schema and write the frames and ``suppressions`` suppressed addresses (not
    timed): every 100th recipient's, the rest nobody's."""
    from include.database.engine import make_engine
    from include.database.schema import events_table, recipients
    from include.database.sql import bulk_write
    from include.operations.database import upgrade_database

    config = parse_config(CONFIG)
    engine = make_engine(url)
    upgrade_database(engine, config.dimensions)
    table = events_table(config.dimensions)
    frame, people = make_frames(events)
    step = 200_000
    with engine.begin() as conn:
        for start in range(0, len(people), step):
            part = people.iloc[start : start + step].astype(object)
            part = part.where(part.notna(), None)
            bulk_write(conn, recipients, RECIPIENT_COLUMNS, list(part.itertuples(index=False, name=None)))
        for start in range(0, len(frame), step):
            part = frame.iloc[start : start + step].astype(object)
            part = part.where(part.notna(), None)
            bulk_write(conn, table, EVENT_COLUMNS, list(part.itertuples(index=False, name=None)))
    _suppress(engine, people["email"].iloc[::100].tolist(), suppressions)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()


def _suppress(engine, recipients_emails: list[str], count: int) -> None:
    from include.suppressions.store import Suppression, add_many

    addresses = recipients_emails[:count] + [
        f"gone{i}@example.net" for i in range(count - len(recipients_emails))
    ]
    for start in range(0, len(addresses), 200_000):
        with engine.begin() as conn:
            add_many(
                conn, [Suppression(a, "unsubscribed") for a in addresses[start : start + 200_000] if "@" in a]
            )


def _peak_rss_mib() -> float:
    """This process's own peak (VmHWM): ru_maxrss would carry the parent's memory over the fork."""
    return _status_kib("self", "VmHWM") / 1024.0


def _status_kib(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if pid == "self" else 0


def _children_peak_kib(stop: threading.Event, peak: list[int]) -> None:
    """Sample the resident memory of this process's children (SQLite's writer) every 0.1 s."""
    me = os.getpid()
    while not stop.wait(0.1):
        total = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if parent == me:
                    total += _status_kib(entry, "VmRSS")
        peak[0] = max(peak[0], total)


def run_matching(url: str, queue: multiprocessing.Queue) -> None:
    """In a fresh process: the whole matching step, timed, and this process's peak RSS."""
    from include.database.engine import make_engine
    from include.matching.run import match_ready_events

    config = parse_config(CONFIG)
    engine = make_engine(url)
    stop, children = threading.Event(), [0]
    sampler = threading.Thread(target=_children_peak_kib, args=(stop, children), daemon=True)
    sampler.start()
    started = time.perf_counter()
    counts = match_ready_events(engine, config, now=T0 + 3 * 86_400.0)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    engine.dispose()
    # SQLite's batches are written by a child process: its sampled peak is added (an upper bound)
    queue.put({"seconds": seconds, "rss_mib": _peak_rss_mib() + children[0] / 1024.0, "counts": counts})


def run_merge(events: int, queue: multiprocessing.Queue) -> None:
    """In a fresh process: a bare pandas merge of the same frames (built first, not timed)."""
    frame, people = make_frames(events)
    frame = frame[
        ["event_id", "trigger_id", "time_gmt", "mc_id", "dim_evar01", "dim_pagename", "dim_products"]
    ]
    baseline = _peak_rss_mib()
    started = time.perf_counter()
    merged = frame.merge(people, on="mc_id", how="left")
    seconds = time.perf_counter() - started
    queue.put(
        {"seconds": seconds, "rss_mib": _peak_rss_mib(), "rss_before_mib": baseline, "rows": len(merged)}
    )


def _in_child(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_matching", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--suppressions",
        type=int,
        default=0,
        help="suppressed addresses loaded (1 %% of the recipients, the rest nobody's)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per database; the median time and the largest peak RSS are printed",
    )
    args = parser.parse_args(argv)
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    print(
        f"matching {args.events:,} staged events against {args.events:,} recipients, "
        f"{args.suppressions:,} suppressed addresses"
    )
    merge = _in_child(run_merge, args.events)
    print(
        f"  bare pandas merge     {merge['seconds']:7.2f} s  {args.events / merge['seconds']:>12,.0f} events/s  "
        f"peak RSS {merge['rss_mib']:,.0f} MiB (frames alone {merge['rss_before_mib']:,.0f} MiB)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_matching_") as workdir:
        for kind in kinds:
            runs = []
            for _ in range(args.repeat):
                url = _fresh_database(kind, Path(workdir))
                prepare(url, args.events, args.suppressions)
                runs.append(_in_child(run_matching, url))
                _drop_database(kind)
            seconds = statistics.median(r["seconds"] for r in runs)
            rss = max(r["rss_mib"] for r in runs)
            counts = runs[-1]["counts"]
            print(
                f"  match_ready_events {kind:<10} {seconds:6.2f} s  {args.events / seconds:>12,.0f} events/s  "
                f"peak RSS {rss:,.0f} MiB  (goal < 30 s, < 2048 MiB)"
            )
            if len(runs) > 1:
                print(
                    "    runs: "
                    + ", ".join(f"{r['seconds']:.2f} s" for r in runs)
                    + " (median above, largest peak RSS)"
                )
            print(f"    counts: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
