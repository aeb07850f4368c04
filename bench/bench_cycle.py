"""Tuning the schedule: per-run overhead, cycle time per backlog, and the latency each schedule gives.

    python -m bench.bench_cycle [--scale 1] [--db sqlite|postgresql|both] [--schedules 1,5,15]
        [--hourly 1000000] [--people 200000] [--fetch-sizes 1000,5000] [--connections 1,4]
        [--airflow-runs 3] [--no-airflow]

1. **Overhead**: wall time of ``airflow dags test triggers_pipeline`` with an empty journal
   (one warm-up, then the median of ``--airflow-runs``): what every scheduled run pays.
2. **Cycle**: for each schedule, the backlog one run sees at ``--hourly`` triggers an hour
   (``hourly * minutes / 60``, divided by ``--scale``), published by the simulator (in its own
   process) over one interval ending an hour ago, so every ``unless`` window is closed. Drain ->
   match -> deliver are called in this process as the DAG's tasks call them, against an audience
   of the simulator's people and the local SMTP server (``include.cli smtp serve``, its own
   process). The default configuration is used with ``limits.rate`` removed (the throttle would
   dominate). Each fetch size drains into its own database (same events); each database is then
   matched, and delivered with one of the connection counts. A delivery larger than
   ``--deliver-sample`` sends that many and scales its time to the whole run (the local SMTP
   server, aiosmtpd on the same 2 cores, accepts only a few hundred messages a second).
3. **Table**: schedule -> events per run, run duration (overhead + drain + match + deliver), the
   latency after an event's ``unless`` window closed (mean interval/2 + run, worst interval + run)
   and the share of each interval the pipeline is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("TRIGGERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_PREFIX = "triggers_cycle_"
TEMPLATES = ROOT / "include" / "templates"
AGE = 3600.0  # the backlog's newest event is this old: every `unless` window (30 min) has closed


def _csv_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Helper processes: the simulator and the SMTP server, each with its own GIL
# ---------------------------------------------------------------------------------------------
def serve_simulator(events: int, people: int, start_time: float, span: float, public_key: str) -> None:
    """Child process: a simulator whose events were published over [start_time, start_time + span]."""
    from include.sandbox.simulator.options import SimulatorOptions
    from include.sandbox.simulator.server import Simulator

    options = SimulatorOptions(
        public_key_pem=Path(public_key).read_bytes(),
        events=events,
        people=people,
        start_time=start_time,
        time_span=span,
        malformed_share=0.001,
        duplicate_share=0.001,
    )
    simulator = Simulator(options)
    print(simulator.start(0), flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        simulator.stop()


def start_simulator(
    events: int, people: int, start_time: float, span: float, public_key: Path
) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.bench_cycle",
            "--simulator",
            str(events),
            str(people),
            repr(start_time),
            repr(span),
            str(public_key),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http"):
        process.kill()
        raise SystemExit("the simulator did not start")
    return process, url


def start_smtp() -> tuple[subprocess.Popen[bytes], int]:
    from include.sandbox.net import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "include.cli", "smtp", "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the SMTP server did not start")


def stop(process: subprocess.Popen) -> None:
    if process.stdin:
        process.stdin.close()
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------
# Databases: a template holding the audience, copied for each measurement
# ---------------------------------------------------------------------------------------------
class Databases:
    """Fresh databases of one kind, each a copy of a template that holds the audience."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.created: list[str] = []
        self.template_url: str | None = None

    def _pg_admin(self):
        from sqlalchemy import create_engine

        return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def _pg_url(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def prepare(self, audience_csv: Path, config) -> tuple[dict, float]:
        from include.audience.load import load_recipients
        from include.database.engine import make_engine
        from include.operations.database import upgrade_database

        self.template_url = self.fresh("template", template=False)
        engine = make_engine(self.template_url)
        upgrade_database(engine, config.dimensions)
        started = time.perf_counter()
        loaded = load_recipients(engine, audience_csv)
        seconds = time.perf_counter() - started
        engine.dispose()
        return loaded, seconds

    def fresh(self, name: str, template: bool = True) -> str:
        """A database named ``name``: empty, or (``template``) a copy of the audience template."""
        from sqlalchemy import text

        if self.kind == "sqlite":
            path = self.workdir / f"{name}.db"
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
            if template:
                shutil.copyfile(self.workdir / "template.db", path)
            return f"sqlite:///{path}"
        database = PG_PREFIX + name
        admin = self._pg_admin()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(
                text(
                    f'CREATE DATABASE "{database}"' + (f' TEMPLATE "{PG_PREFIX}template"' if template else "")
                )
            )
        admin.dispose()
        self.created.append(database)
        return self._pg_url(database)

    def drop_all(self) -> None:
        if self.kind != "postgresql":
            return
        from sqlalchemy import text

        admin = self._pg_admin()
        with admin.connect() as conn:
            for database in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def bench_config(fetch_size: int = 1000):
    """The default configuration with ``limits.rate`` removed (and the given fetch size)."""
    from include.config import load_config

    config = load_config()
    return config.model_copy(
        update={
            "pipeline": config.pipeline.model_copy(update={"fetch_size": fetch_size}),
            "limits": config.limits.model_copy(update={"rate": None}),
        }
    )


def journal_client(url: str, private_key: Path, config):
    """The simulator's journal for ``config``'s consumer, as AdobePipelineHook's get_conn() makes it."""
    from include.adobe.auth import ImsAuthenticator, PipelineCredentials
    from include.adobe.journal import JournalClient
    from include.sandbox.simulator.options import SimulatorOptions

    options = SimulatorOptions()
    authenticator = ImsAuthenticator(
        PipelineCredentials(
            pipeline_url=url,
            ims_url=url,
            client_id=options.client_id,
            client_secret=options.client_secret,
            org_id=options.org_id,
            technical_account_id=options.technical_account_id,
            private_key=private_key.read_bytes(),
        )
    )
    return JournalClient(
        authenticator, config.pipeline.consumer, retry_validity=config.pipeline.retry_validity
    )


def measure_cycle(
    databases: Databases,
    schedule: int,
    events: int,
    people: int,
    private_key: Path,
    public_key: Path,
    fetch_sizes: list[int],
    connections: list[int],
    deliver_sample: int,
) -> dict:
    """Drain the backlog of one run with each fetch size, then match and deliver each copy."""
    from include.database.engine import make_engine
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    from include.delivery.smtp import SmtpSettings
    from include.matching.run import match_ready_events
    from include.staging.drain import drain

    span = schedule * 60.0
    copies = max(len(fetch_sizes), len(connections))
    simulator, url = start_simulator(events, people, time.time() - AGE - span, span, public_key)
    smtp_process, smtp_port = start_smtp()
    # what PipeliningSmtpHook reads from smtp_default, without Airflow in the measured process
    smtp = SmtpSettings(
        host="127.0.0.1", port=smtp_port, use_ssl=False, starttls=False, from_email="shop@example.com"
    )
    result: dict = {"schedule": schedule, "events": events, "drain": [], "match": [], "deliver": []}
    try:
        urls = [databases.fresh(f"m{schedule}_{i}") for i in range(copies)]
        for i, db_url in enumerate(urls):
            fetch_size = fetch_sizes[i % len(fetch_sizes)]
            engine = make_engine(db_url)
            config = bench_config(fetch_size)
            report = drain(engine, config, journal_client(url, private_key, config))
            engine.dispose()
            if i < len(fetch_sizes):
                result["drain"].append(
                    {
                        "fetch_size": fetch_size,
                        "seconds": report.seconds,
                        "received": report.received,
                        "staged": report.staged,
                        "pages": report.pages,
                    }
                )
                print(
                    f"    drain  fetch_size {fetch_size:>5}: {report.received:>8,} events in {report.seconds:6.1f} s "
                    f"({report.pages} pages)",
                    flush=True,
                )
        config = bench_config()
        for i, db_url in enumerate(urls):
            engine = make_engine(db_url)
            started = time.perf_counter()
            counts = match_ready_events(engine, config, now=time.time())
            seconds = time.perf_counter() - started
            engine.dispose()
            result["match"].append({"seconds": round(seconds, 3), "counts": counts})
            print(
                f"    match  copy {i}: {counts['ready']:>8,} ready, {counts['pending']:>7,} to send in "
                f"{seconds:6.1f} s",
                flush=True,
            )
        for i, db_url in enumerate(urls[: len(connections)]):
            pending = result["match"][i]["counts"]["pending"]
            engine = make_engine(db_url)
            started = time.perf_counter()
            counts = deliver_pending(
                engine,
                config,
                smtp,
                DeliveryOptions(
                    templates_dir=TEMPLATES,
                    worker_id=f"bench-{i}",
                    connections=connections[i],
                    max_messages=deliver_sample or None,
                ),
            )
            seconds = time.perf_counter() - started
            engine.dispose()
            sent = counts.get("sent", 0)
            # a sample of a large backlog: the whole of it would take pending/sent times as long
            whole = seconds * pending / sent if sent and sent < pending else seconds
            result["deliver"].append(
                {
                    "connections": connections[i],
                    "seconds": round(whole, 3),
                    "measured_seconds": round(seconds, 3),
                    "sent": sent,
                    "pending": pending,
                    "extrapolated": sent < pending,
                    "counts": counts,
                }
            )
            sample = f" (a sample; all {pending:,}: ~{whole:.0f} s)" if sent < pending else ""
            print(
                f"    deliver {connections[i]} connection(s): {sent:>7,} sent in {seconds:6.1f} s "
                f"({sent / max(seconds, 1e-9):,.0f}/s){sample}",
                flush=True,
            )
    finally:
        stop(smtp_process)
        stop(simulator)
    return result


def measure_overhead(
    databases: Databases, workdir: Path, private_key: Path, public_key: Path, runs: int
) -> dict:
    """Wall time of `airflow dags test triggers_pipeline` with an empty journal: warm-up + ``runs``."""
    from include.sandbox.demo import AIRFLOW, airflow_environment
    from include.sandbox.simulator.options import SimulatorOptions

    db_url = databases.fresh("airflow")
    simulator, url = start_simulator(0, 1000, time.time() - 60, 60.0, public_key)
    smtp_process, smtp_port = start_smtp()
    try:
        environment = airflow_environment(workdir, url, smtp_port, private_key, SimulatorOptions(), db_url)
        environment["TRIGGERS_TOKEN_CACHE"] = str(workdir / "token-cache")
        environment["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "INFO"  # task start/end times, for the split below
        started = time.perf_counter()
        subprocess.run([AIRFLOW, "db", "migrate"], env=environment, check=True, capture_output=True)
        migrate = time.perf_counter() - started
        print(f"    airflow db migrate (once, not counted): {migrate:.1f} s", flush=True)
        times, task_spans = [], []
        for index in range(runs + 1):
            started = time.perf_counter()
            run = subprocess.run(
                [AIRFLOW, "dags", "test", "triggers_pipeline"],
                env=environment,
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - started
            if run.returncode:
                raise SystemExit(f"the DAG run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
            span = tasks_span(run.stdout + run.stderr)
            print(
                f"    {'warm-up' if index == 0 else f'run {index}'}: {seconds:.1f} s, of which the five tasks "
                f"{span:.1f} s ({_load()})",
                flush=True,
            )
            if index:
                times.append(seconds)
                task_spans.append(span)
    finally:
        stop(smtp_process)
        stop(simulator)
    return {
        "runs": [round(t, 2) for t in times],
        "median": round(statistics.median(times), 2),
        "tasks_median": round(statistics.median(task_spans), 2),
        "migrate": round(migrate, 1),
    }


def tasks_span(log: str) -> float:
    """Seconds from the first task's start to the last task's end in a `dags test` log: the run
    without the command's start-up (imports, DAG parsing, its in-process execution API)."""
    from datetime import datetime

    starts, ends = [], []
    for line in log.splitlines():
        stamp = line.split(" ", 1)[0]
        if "Task started" in line:
            starts.append(stamp)
        elif "[DAG TEST] end task" in line:
            ends.append(stamp)
    if not starts or not ends:
        return float("nan")
    first, last = (datetime.fromisoformat(s.replace("Z", "+00:00")) for s in (starts[0], ends[-1]))
    return (last - first).total_seconds()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def summary_table(overhead: float, cycles: list[dict], scale: int) -> str:
    """The Markdown table of schedule -> events, run duration, latency and load."""
    lines = [
        "| schedule | events per run | drain s (fetch "
        + " / ".join(str(d["fetch_size"]) for d in cycles[0]["drain"])
        + ") | match s | deliver s ("
        + " / ".join(f"{d['connections']} conn." for d in cycles[0]["deliver"])
        + ") | emails | run duration | mean latency | worst latency | busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cycle in cycles:
        interval = cycle["schedule"] * 60.0
        drain_best = min(d["seconds"] for d in cycle["drain"])
        match_median = statistics.median(m["seconds"] for m in cycle["match"])
        deliver_best = min(d["seconds"] for d in cycle["deliver"])
        drain_worst = max(d["seconds"] for d in cycle["drain"])
        deliver_worst = max(d["seconds"] for d in cycle["deliver"])
        best = overhead + drain_best + match_median + deliver_best
        worst = overhead + drain_worst + match_median + deliver_worst
        run = f"{best:.0f} s" if abs(worst - best) < 1 else f"{best:.0f}–{worst:.0f} s"
        mean_latency, worst_latency = _minutes(interval / 2 + best), _minutes(interval + worst)
        if (
            best > interval
        ):  # each run takes longer than it has: the backlog, and the wait, grow without bound
            mean_latency = worst_latency = "grows"
        elif worst > interval:
            worst_latency = "grows"
        busy = f"{best / interval:.0%}", f"{worst / interval:.0%}"
        busy = busy[0] if busy[0] == busy[1] else "–".join(busy)
        lines.append(
            f"| every {cycle['schedule']} min | {cycle['events']:,} | "
            + " / ".join(f"{d['seconds']:.1f}" for d in cycle["drain"])
            + f" | {match_median:.1f} | "
            + " / ".join(f"{'~' if d['extrapolated'] else ''}{d['seconds']:.1f}" for d in cycle["deliver"])
            + f" | {cycle['deliver'][0]['pending']:,} | {run} | {mean_latency} | {worst_latency} | {busy} |"
        )
    if any(d["extrapolated"] for cycle in cycles for d in cycle["deliver"]):
        lines.append("\n~ : the delivery of a sample (--deliver-sample), scaled to every email of the run")
    if scale != 1:
        lines.append(f"\n(backlogs divided by --scale {scale}: not the full-size figures)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="divide every backlog by this (a quick run)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument(
        "--schedules", default="1,5,15", help="schedule intervals in minutes, comma-separated"
    )
    parser.add_argument("--hourly", type=int, default=1_000_000, help="triggers an hour")
    parser.add_argument(
        "--people", type=int, default=200_000, help="shoppers in the simulator and the audience"
    )
    parser.add_argument("--fetch-sizes", default="1000,5000", help="pipeline.fetch_size values for the drain")
    parser.add_argument("--connections", default="1,4", help="delivery SMTP connections")
    parser.add_argument(
        "--deliver-sample",
        type=int,
        default=10_000,
        help="send at most this many per delivery and extrapolate to the whole backlog (0: all)",
    )
    parser.add_argument("--airflow-runs", type=int, default=3, help="timed empty DAG runs after one warm-up")
    parser.add_argument("--no-airflow", action="store_true", help="skip the empty-run overhead")
    parser.add_argument(
        "--overhead", type=float, default=None, help="use this overhead (s) instead of measuring it"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--simulator", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulator:
        events, people, start_time, span, public_key = args.simulator
        serve_simulator(int(events), int(people), float(start_time), float(span), public_key)
        return

    from include.sandbox.keys import create_key_pair
    from include.sandbox.simulator.population import write_audience_csv

    os.environ["TRIGGERS_TOKEN_CACHE"] = "off"
    schedules = _csv_ints(args.schedules)
    fetch_sizes, connections = _csv_ints(args.fetch_sizes), _csv_ints(args.connections)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    began = time.perf_counter()
    print(
        f"cycle bench: {args.hourly:,} triggers/hour, schedules {schedules} min, scale 1/{args.scale}, "
        f"{args.people:,} people; limits.rate removed; {_load()}",
        flush=True,
    )
    figures: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": os.getloadavg(),
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-cycle-") as tmp:
        workdir = Path(tmp)
        private_key, public_key = create_key_pair(workdir / "keys")
        audience_csv = write_audience_csv(workdir / "audience.csv", args.people)
        for kind in kinds:
            print(f"\n{kind}", flush=True)
            databases = Databases(kind, workdir)
            try:
                loaded, seconds = databases.prepare(audience_csv, bench_config())
                print(
                    f"  audience: {loaded['loaded']:,} recipients loaded in {seconds:.1f} s (once, copied to each database)",
                    flush=True,
                )
                overhead: dict = {"median": args.overhead or 0.0, "runs": []}
                if not args.no_airflow and args.overhead is None:
                    print(
                        "  per-run overhead: airflow dags test triggers_pipeline, empty journal", flush=True
                    )
                    overhead = measure_overhead(
                        databases, workdir / f"airflow-{kind}", private_key, public_key, args.airflow_runs
                    )
                    print(
                        f"  overhead median {overhead['median']:.1f} s (the five tasks: {overhead['tasks_median']:.1f} s)",
                        flush=True,
                    )
                cycles = []
                for schedule in schedules:
                    events = args.hourly * schedule // 60 // args.scale
                    print(f"  cycle for every {schedule} min: {events:,} events ({_load()})", flush=True)
                    cycles.append(
                        measure_cycle(
                            databases,
                            schedule,
                            events,
                            args.people,
                            private_key,
                            public_key,
                            fetch_sizes,
                            connections,
                            args.deliver_sample,
                        )
                    )
                figures["kinds"][kind] = {"overhead": overhead, "cycles": cycles}
                measured = f"median of {len(overhead['runs'])}" if overhead["runs"] else "given, not measured"
                print(
                    f"\n{kind}: per-run overhead {overhead['median']:.1f} s ({measured}); {_load()}\n",
                    flush=True,
                )
                print(summary_table(overhead["median"], cycles, args.scale), flush=True)
            finally:
                databases.drop_all()
    figures["load_after"] = os.getloadavg()
    figures["seconds"] = round(time.perf_counter() - began, 1)
    print(f"\nbench took {figures['seconds']:.0f} s; {_load()}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
