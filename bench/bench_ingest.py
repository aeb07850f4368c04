"""Drain N simulator events into staging; compare with a raw bulk insert of the same rows.

    python -m bench.bench_ingest [--events 1000000] [--db sqlite|postgresql|both] [--fetch-size 1000]

The simulator runs in its own process (as Adobe would, it does not share our GIL). Each drain
runs in a fresh child process so that its peak RSS is its own. The raw insert writes the rows
the drain staged, read back from the same database, into a twin table (SQLite ``executemany``,
PostgreSQL ``COPY``, no conflict handling): once with the same key and indexes as
``pipeline_events`` (what storing these rows costs), once bare (the database's floor).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("TRIGGERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def start_simulator(events: int, workdir: Path) -> tuple[subprocess.Popen, str, Path, dict]:
    from include.sandbox.keys import create_key_pair

    private_key, public_key = create_key_pair(workdir / "keys")
    port = 18765
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "include.cli",
            "simulator",
            "serve",
            "--port",
            str(port),
            "--events",
            str(events),
            "--public-key",
            str(public_key),
            "--malformed-share",
            "0.001",
            "--duplicate-share",
            "0.001",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            stats = requests.get(f"{url}/_sim/stats", timeout=1).json()
            return process, url, private_key, stats
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the simulator did not start")


def fresh_database(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS triggers_bench WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE triggers_bench"))
    admin.dispose()
    return make_url(PG_ADMIN_URL).set(database="triggers_bench").render_as_string(hide_password=False)


def create_schema(db_url: str) -> None:
    """What ``db upgrade`` does, with the default configuration's dimensions (not timed)."""
    from include.config import load_config
    from include.database.engine import make_engine
    from include.operations.database import upgrade_database

    engine = make_engine(db_url)
    upgrade_database(engine, load_config().dimensions)
    engine.dispose()


def drain_worker(db_url: str, simulator_url: str, private_key: str, fetch_size: int) -> None:
    """Child process: drain everything, print seconds and peak RSS as JSON."""
    from include.adobe.auth import ImsAuthenticator, PipelineCredentials
    from include.adobe.journal import JournalClient
    from include.config import load_config
    from include.database.engine import make_engine
    from include.sandbox.simulator.options import SimulatorOptions
    from include.staging.drain import drain

    options = SimulatorOptions()
    config = load_config()
    config = config.model_copy(
        update={"pipeline": config.pipeline.model_copy(update={"fetch_size": fetch_size})}
    )
    credentials = PipelineCredentials(
        pipeline_url=simulator_url,
        ims_url=simulator_url,
        client_id=options.client_id,
        client_secret=options.client_secret,
        org_id=options.org_id,
        technical_account_id=options.technical_account_id,
        private_key=Path(private_key).read_bytes(),
    )
    engine = make_engine(db_url)
    client = JournalClient(
        ImsAuthenticator(credentials), config.pipeline.consumer, retry_validity=config.pipeline.retry_validity
    )
    report = drain(engine, config, client)
    peak_kib = peak_rss_kib()
    print(
        json.dumps(
            {
                "seconds": report.seconds,
                "received": report.received,
                "staged": report.staged,
                "pages": report.pages,
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
    )


def peak_rss_kib() -> int:
    """This process's peak resident memory. Not ``ru_maxrss``: across fork and exec, Linux
    carries over the parent's resident size at the fork, so a child of a large process would
    report the parent's memory (the bench's own, after reading back a million rows)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def raw_insert_seconds(db_url: str, *, indexed: bool, chunk: int = 100_000) -> tuple[float, int]:
    """Copy the staged rows into a twin table (with the same key and indexes, or bare); time
    only the writes: no HTTP, no parsing, no conflict handling."""
    from include.database.engine import make_engine
    from include.database.schema import EVENT_INDEXES

    engine = make_engine(db_url)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS raw_events")
        if postgres:
            conn.exec_driver_sql(
                f"CREATE TABLE raw_events (LIKE pipeline_events {'INCLUDING ALL' if indexed else ''})"
            )
        else:
            conn.exec_driver_sql("CREATE TABLE raw_events AS SELECT * FROM pipeline_events WHERE 0")
            if indexed:
                conn.exec_driver_sql("CREATE UNIQUE INDEX raw_events_key ON raw_events (event_id)")
                for number, (_, columns) in enumerate(EVENT_INDEXES):
                    conn.exec_driver_sql(
                        f"CREATE INDEX raw_events_{number} ON raw_events ({', '.join(columns)})"
                    )
    with engine.connect() as probe:
        columns = [c["name"] for c in engine.dialect.get_columns(probe, "pipeline_events")]
    names = ", ".join(f'"{c}"' for c in columns)
    elapsed, total = 0.0, 0
    with engine.connect() as reader:
        result = reader.exec_driver_sql(f"SELECT {names} FROM pipeline_events").yield_per(chunk)
        for rows in result.partitions(chunk):
            rows = [tuple(r) for r in rows]
            started = time.perf_counter()
            with engine.begin() as conn:
                cursor = conn.connection.dbapi_connection.cursor()
                if postgres:
                    with cursor.copy(f"COPY raw_events ({names}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                else:
                    marks = ", ".join("?" for _ in columns)
                    cursor.executemany(f"INSERT INTO raw_events ({names}) VALUES ({marks})", rows)
            elapsed += time.perf_counter() - started
            total += len(rows)
    engine.dispose()
    return elapsed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--fetch-size", type=int, default=1000)
    parser.add_argument(
        "--worker", nargs=4, metavar=("DB_URL", "SIM_URL", "KEY", "FETCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        drain_worker(args.worker[0], args.worker[1], args.worker[2], int(args.worker[3]))
        return
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        simulator, url, private_key, _ = start_simulator(args.events, workdir)
        try:
            print(f"ingestion: {args.events:,} simulator events, fetch_size {args.fetch_size}")
            for kind in kinds:
                db_url = fresh_database(kind, workdir)
                create_schema(db_url)
                requests.post(f"{url}/_sim/faults", json={"clear": True}, timeout=5)
                run = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.bench_ingest",
                        "--worker",
                        db_url,
                        url,
                        str(private_key),
                        str(args.fetch_size),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "TRIGGERS_TOKEN_CACHE": "off"},
                )
                if run.returncode:
                    raise SystemExit(run.stderr[-3000:])
                result = json.loads(run.stdout.strip().splitlines()[-1])
                rate = result["received"] / result["seconds"]
                print(
                    f"  {kind:<10} drain {result['received']:,} events in {result['seconds']:.1f} s = "
                    f"{rate:,.0f} events/s, peak RSS {result['peak_rss_mib']:,.0f} MiB, "
                    f"load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                for indexed in (True, False):
                    raw_seconds, raw_rows = raw_insert_seconds(db_url, indexed=indexed)
                    raw_rate = raw_rows / raw_seconds
                    shape = "same key and indexes" if indexed else "bare table, no index"
                    print(
                        f"  {'':<10} raw insert of the {raw_rows:,} staged rows, {shape}: {raw_seconds:.1f} s = "
                        f"{raw_rate:,.0f} rows/s; drain / raw = {rate / raw_rate:.2f}",
                        flush=True,
                    )
        finally:
            simulator.terminate()
            simulator.wait()


if __name__ == "__main__":
    main()
