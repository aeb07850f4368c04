"""The tuning table: per cadence, the latency from event to email under a real scheduler, and what a run costs.

    python -m bench.bench_schedule [--cadences 30s,1m,5m] [--runs 6,6,3] [--rate 1] [--people 20000]
        [--out FILE.json]

For each cadence a throw-away Airflow (``tests/airflow_harness.py``: api-server and scheduler with
the LocalExecutor, SQLite metadata database) runs ``triggers_pipeline`` on ``TRIGGERS_SCHEDULE``
set to that cadence, as a user's installation does; not ``airflow dags test``. The simulator
publishes ``--rate`` events a second for the whole measurement, each with its trigger time =
the moment it is published, and the local SMTP server stamps each email when it arrives, so an
email's latency is its arrival minus its event's trigger time (joined by Message-ID ->
``deliveries.event_time``). The configuration is the default one without ``unless`` windows
and without the send throttle: an ``unless: within 30m`` holds every email 30 minutes by design,
which would hide what the schedule costs.

The first run (which drains what was published while Airflow started) is a warm-up and not
counted; then ``--runs`` runs per cadence are measured. Per run: the tasks' durations (from the
REST API), the time a run waits after its interval ends, the Airflow CPU (api-server, scheduler
and every task process they started, from /proc via psutil) and the growth of the metadata
database (bytes and rows of dag_run, task_instance, xcom, log). One JSON line per cadence is
written to ``--out`` as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from sqlalchemy import select

from include.audience.load import load_recipients
from include.config import load_config, parse_schedule
from include.database.engine import make_engine
from include.database.schema import deliveries
from include.operations.database import upgrade_database
from include.sandbox.keys import connection_json, create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from tests.airflow_harness import ROOT, AirflowHarness, wait_for

DAG_ID = "triggers_pipeline"
METADATA_TABLES = ("dag_run", "task_instance", "xcom", "log")


def write_config(path: Path) -> Path:
    """The default configuration without ``unless`` windows and send throttle (see the docstring)."""
    config = yaml.safe_load((ROOT / "include" / "triggers.yaml").read_text())
    for campaign in config["campaigns"]:
        campaign.pop("unless", None)
    config["limits"].pop("rate", None)
    path.write_text(yaml.safe_dump(config))
    return path


def _unix(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class Publisher:
    """A thread publishing ``rate`` events a second, each stamped with its publication time."""

    def __init__(self, simulator: Simulator, rate: float) -> None:
        self.simulator, self.rate = simulator, rate
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        began, published = time.time(), 0
        while not self.stop.wait(0.05):
            due = int((time.time() - began) * self.rate) - published
            if due > 0:
                self.simulator.publish(due)
                published += due


def _interval_seconds(cadence: str) -> float:
    schedule = parse_schedule(cadence)
    return 3600.0 if isinstance(schedule, str) else schedule.total_seconds()  # cron: a generous bound


def cpu_seconds(processes: list) -> float:
    """CPU time of the components and everything they started (reaped children included)."""
    total = 0.0
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in tree:  # a live process's own time, plus its children's once reaped
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def metadata_size(home: Path) -> dict[str, int]:
    """Rows of the tables a run writes to, and the bytes of the pages in use (the WAL's committed
    pages included: the files' sizes jump at checkpoints and never shrink)."""
    path = home / "airflow.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        rows = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in METADATA_TABLES}
        page_size, pages, free = (
            db.execute(f"PRAGMA {pragma}").fetchone()[0]
            for pragma in ("page_size", "page_count", "freelist_count")
        )
    return {"bytes": page_size * (pages - free), **rows}


def finished_runs(airflow: AirflowHarness) -> list[dict[str, Any]]:
    runs = airflow.api(f"/dags/{DAG_ID}/dagRuns?limit=200&order_by=run_after")["dag_runs"]
    return [r for r in runs if r["run_type"] == "scheduled" and r["state"] in ("success", "failed")]


def task_durations(airflow: AirflowHarness, run_id: str) -> dict[str, float]:
    quoted = urllib.parse.quote(run_id, safe="")
    instances = airflow.api(f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances")["task_instances"]
    return {ti["task_id"]: float(ti["duration"] or 0.0) for ti in instances}


def measure(cadence: str, runs: int, rate: float, people: int, workdir: Path) -> dict[str, Any]:
    """One cadence, one fresh Airflow: ``runs`` scheduled runs after a warm-up run."""
    private_key, public_key = create_key_pair(workdir / "keys")
    options = SimulatorOptions(public_key_pem=public_key.read_bytes(), people=people, seed=5)
    db_url = f"sqlite:///{workdir / 'triggers.db'}"
    config_path = write_config(workdir / "triggers.yaml")
    engine = make_engine(db_url)
    upgrade_database(engine, load_config(config_path).dimensions)
    write_audience_csv(workdir / "audience.csv", people)
    load_recipients(engine, workdir / "audience.csv")
    with Simulator(options) as simulator, LocalSmtpServer("127.0.0.1") as smtp:
        env = {
            "TRIGGERS_DB_URL": db_url,
            "TRIGGERS_CONFIG": str(config_path),
            "TRIGGERS_SCHEDULE": cadence,
            "TRIGGERS_TOKEN_CACHE": str(workdir / "token-cache"),
            "AIRFLOW_CONN_ADOBE_PIPELINE": connection_json(
                host=simulator.url,
                client_id=options.client_id,
                client_secret=options.client_secret,
                org_id=options.org_id,
                technical_account_id=options.technical_account_id,
                private_key_path=str(private_key),
                ims_url=simulator.url,
            ),
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": smtp.port,
                    "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "shop@example.com"},
                }
            ),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # only the pipeline is unpaused
        }
        with AirflowHarness(workdir / "airflow", env=env) as airflow:
            airflow.cli("db", "migrate", timeout=600)
            airflow.start("api-server", "scheduler")
            airflow.cli("dags", "reserialize", timeout=300)
            airflow.wait_until_healthy(timeout=180)
            wait_for(f"{DAG_ID} in the API", lambda: airflow.api(f"/dags/{DAG_ID}"), 120)
            publisher = Publisher(simulator, rate)
            publisher.thread.start()
            airflow.api(f"/dags/{DAG_ID}", {"is_paused": False}, method="PATCH")
            explain = airflow.log_tail
            wait_for("the warm-up run", lambda: finished_runs(airflow), 900, explain=explain, interval=1)
            cpu_before, db_before = cpu_seconds(airflow.processes), metadata_size(airflow.home)
            done = wait_for(
                f"{runs} measured runs",
                lambda: (found := finished_runs(airflow)) and len(found) > runs and found,
                900 + runs * 2 * _interval_seconds(cadence),
                explain=explain,
                interval=1,
            )
            cpu_after, db_after = cpu_seconds(airflow.processes), metadata_size(airflow.home)
            measured = done[1 : runs + 1]
            durations = [task_durations(airflow, r["dag_run_id"]) for r in measured]
            publisher.stop.set()
        emails = list(smtp.messages)
    return summarise(
        cadence, measured, durations, emails, engine, cpu_after - cpu_before, db_before, db_after
    )


def summarise(cadence, measured, durations, emails, engine, cpu, db_before, db_after) -> dict[str, Any]:
    with engine.connect() as conn:
        event_time = dict(conn.execute(select(deliveries.c.delivery_id, deliveries.c.event_time)).all())
    windows = [(_unix(r["start_date"]), _unix(r["end_date"])) for r in measured]
    latencies = []
    for email in emails:
        delivery_id = (email.message_id or "").strip("<>").split("@")[0]
        if delivery_id in event_time and any(s <= email.received_at <= e for s, e in windows):
            latencies.append(email.received_at - event_time[delivery_id])
    n = len(measured)
    tasks = sorted({task for d in durations for task in d})
    return {
        "cadence": cadence,
        "runs": n,
        "states": [r["state"] for r in measured],
        "emails": len(latencies),
        "latency_median_s": round(statistics.median(latencies), 1) if latencies else None,
        "latency_p95_s": round(_percentile(latencies, 0.95), 1) if latencies else None,
        "run_seconds_median": round(statistics.median(e - s for s, e in windows), 1),
        "wait_after_interval_s": round(
            statistics.median(_unix(r["start_date"]) - _unix(r["data_interval_end"]) for r in measured), 1
        ),
        "task_seconds_median": {
            t: round(statistics.median(d.get(t, 0.0) for d in durations), 2) for t in tasks
        },
        "cpu_seconds_per_run": round(cpu / n, 1),
        "metadata_db_per_run": {k: round((db_after[k] - db_before[k]) / n, 1) for k in db_before},
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cadences", default="30s,1m,5m")
    parser.add_argument("--runs", default="6,6,3", help="measured runs per cadence (after one warm-up run)")
    parser.add_argument("--rate", type=float, default=1.0, help="events published per second")
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per cadence")
    args = parser.parse_args()
    cadences = [c.strip() for c in args.cadences.split(",")]
    runs = [int(r) for r in args.runs.split(",")]
    if len(runs) != len(cadences):
        parser.error("--runs needs one number per cadence")
    for cadence, count in zip(cadences, runs, strict=True):
        parse_schedule(cadence)  # a typo fails now, not after the first cadence's minutes
        with tempfile.TemporaryDirectory(prefix="audience-bench-") as tmp:
            began = time.monotonic()
            result = measure(cadence, count, args.rate, args.people, Path(tmp))
            result["wall_seconds"] = round(time.monotonic() - began)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
