"""Backfill events (issue 5): import an export, backfill three hours, each email once.

A user holds an export of past events (JSON lines, one journal event per line, from
2026-01-04 23:00 to 2026-01-05 04:00 UTC). They stage it with ``python -m include.cli import``
and run ``airflow backfill create`` over 00:00-03:00 with an hourly ``TRIGGERS_SCHEDULE``. A
real Airflow (api-server, scheduler with the LocalExecutor, SQLite metadata database: see
``tests/airflow_harness.py``) runs the three backfill runs, and a real SMTP server receives the
emails. Then the export is imported again and the middle hour's run cleared and rerun, its
events made ``new`` again first so that the rerun really decides them: nothing is sent twice.

The staging database is one SQLite file, shared by the test, the CLI and the task processes:
what is under test is the split into data intervals and Airflow's orchestration, which do not
depend on the database; matching and delivery run on both databases in their own tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlalchemy import Engine, text

from include.audience.load import load_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.matching.run import match_ready_events
from include.sandbox.simulator.events import EventFactory
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.smtp_server import LocalSmtpServer
from include.staging.imports import import_export
from tests.airflow_harness import ROOT, AirflowHarness, wait_for
from tests.conftest import upgrade_schema

pytestmark = pytest.mark.slow

HOUR = 3600
FIRST_HOUR = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
BACKFILLED = [(FIRST_HOUR + k * HOUR, FIRST_HOUR + (k + 1) * HOUR) for k in range(3)]
RANGE_START, RANGE_END = BACKFILLED[0][0], BACKFILLED[-1][1]
EXPORT_START, EXPORT_END = RANGE_START - HOUR, RANGE_END + HOUR  # an hour either side is not backfilled
EVENTS, PEOPLE = 600, 300
DAG_ID = "triggers_pipeline"
SENDER_DOMAIN = "example.com"  # of the default configuration's senders


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- the user's files ---------------------------------------------------------------------------


def write_export(path: Path) -> Path:
    """The simulator's events fired evenly over EXPORT_START..EXPORT_END, one JSON event per line."""
    factory = EventFactory(SimulatorOptions(people=PEOPLE, seed=11))
    step = (EXPORT_END - EXPORT_START) / EVENTS
    whens = EXPORT_START + step / 2 + np.arange(EVENTS) * step
    texts = factory.render_events(np.arange(EVENTS), whens, np.full(EVENTS, step))
    path.write_text("".join(f"{event}\n" for event in texts), encoding="utf-8")
    return path


def write_config(path: Path) -> Path:
    """The default configuration without its send throttle (10/s per domain would pace the test)."""
    config = yaml.safe_load((ROOT / "include" / "triggers.yaml").read_text())
    config["limits"].pop("rate", None)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_import(env: dict[str, str], export: Path) -> dict[str, int]:
    """``python -m include.cli import EXPORT``: the one command the user runs."""
    done = subprocess.run(
        [sys.executable, "-m", "include.cli", "import", str(export)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_pass_decisions(tmp_path: Path, config_path: Path, audience: Path, export: Path) -> set[tuple]:
    """The oracle: (delivery_id, status, reason) of the same export decided in one pass over
    the whole range, in-process, on a database of its own."""
    oracle = make_engine(f"sqlite:///{tmp_path / 'oracle.db'}")
    config = load_config(config_path, ROOT / "include" / "templates")
    upgrade_schema(oracle, config.dimensions)
    load_recipients(oracle, audience)
    import_export(oracle, config, str(export))
    match_ready_events(oracle, config, now=time.time(), interval=(RANGE_START, RANGE_END))
    decisions = set(rows(oracle, "SELECT delivery_id, status, reason FROM deliveries"))
    oracle.dispose()
    return decisions


# --- reading what happened ----------------------------------------------------------------------


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))


def new_events_per_hour(engine: Engine) -> dict[float, int]:
    counts = rows(
        engine,
        "SELECT CAST(time_gmt / 3600 AS INTEGER) * 3600, COUNT(*) FROM pipeline_events "
        "WHERE status = 'new' GROUP BY 1",
    )
    return {float(hour): count for hour, count in counts}


def run_counts(engine: Engine, run_id: str) -> dict[str, Any]:
    """The counts the run's report task stored in ``pipeline_runs``."""
    return json.loads(
        rows(engine, "SELECT counts FROM pipeline_runs WHERE run_id = :run_id", run_id=run_id)[0].counts
    )


def deliveries_snapshot(engine: Engine) -> set[tuple]:
    return set(
        rows(engine, "SELECT delivery_id, status, reason, attempts, sent_at, claimed_by FROM deliveries")
    )


def _run_path(run_id: str) -> str:
    return f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"


def backfill_runs(airflow: AirflowHarness) -> dict[str, dict[str, Any]]:
    found = airflow.api(f"/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=100")["dag_runs"]
    return {run["dag_run_id"]: run for run in found}


def task_instances(airflow: AirflowHarness, run_id: str) -> dict[str, dict[str, Any]]:
    return {ti["task_id"]: ti for ti in airflow.api(f"{_run_path(run_id)}/taskInstances")["task_instances"]}


def task_logs(airflow: AirflowHarness, run_id: str | None = None) -> str:
    """The end of each task log of the run (or of every run): why a task failed."""
    pattern = f"dag_id={DAG_ID}/run_id={run_id or '*'}/task_id=*/*.log"
    tails = [
        f"--- {path.relative_to(airflow.home)}\n{path.read_text(errors='replace')[-2500:]}"
        for path in sorted((airflow.home / "logs").glob(pattern))
    ]
    return "\n".join(tails[-10:])


def wait_for_runs(
    airflow: AirflowHarness, done: Callable[[dict[str, dict[str, Any]]], Any], what: str, timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll the backfill runs until ``done(runs)``; a failed run fails at once, with its task logs."""

    def check() -> dict[str, dict[str, Any]] | None:
        runs = backfill_runs(airflow)
        failed = [run_id for run_id, run in runs.items() if run["state"] == "failed"]
        if failed:
            raise AssertionError(f"backfill run {failed[0]} failed:\n{task_logs(airflow, failed[0])}")
        return runs if done(runs) else None

    def explain() -> str:
        states = {run_id: run["state"] for run_id, run in backfill_runs(airflow).items()}
        return f"backfill runs: {states}\n{airflow.log_tail()}\n{task_logs(airflow)}"

    return wait_for(what, check, timeout, processes=airflow.processes, explain=explain, interval=1.0)


# --- the test -----------------------------------------------------------------------------------


def test_import_then_backfill_three_hours_sends_each_email_once(tmp_path: Path) -> None:
    began = time.monotonic()

    def step(what: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)

    staging_url = f"sqlite:///{tmp_path / 'triggers.db'}"
    export = write_export(tmp_path / "export.jsonl")
    config_path = write_config(tmp_path / "triggers.yaml")
    audience = write_audience_csv(tmp_path / "audience.csv", PEOPLE)
    engine = make_engine(staging_url)
    upgrade_schema(
        engine, load_config(config_path, ROOT / "include" / "templates").dimensions
    )  # `db upgrade`

    with (
        LocalSmtpServer("127.0.0.1") as smtp,
        AirflowHarness(
            tmp_path / "airflow",
            env={
                "TRIGGERS_DB_URL": staging_url,
                "TRIGGERS_CONFIG": str(config_path),
                "TRIGGERS_SCHEDULE": "0 * * * *",  # one run per hour of data
                "TRIGGERS_TOKEN_CACHE": str(tmp_path / "token-cache"),
                "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
                    {
                        "conn_type": "smtp",
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "extra": {
                            "disable_ssl": True,
                            "disable_tls": True,
                            "from_email": f"shop@{SENDER_DOMAIN}",
                        },
                    }
                ),
                # the backfill's runs only: a scheduled run would match every ready event, imported ones too
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # no task of a paused DAG is scheduled
                "AIRFLOW__CORE__PARALLELISM": "4",
            },
        ) as airflow,
    ):
        try:
            migrate = airflow.cli_in_background("db", "migrate")

            # meanwhile, what the user does: load the audience, import the export
            load_recipients(engine, audience)
            imported = cli_import(airflow.env, export)
            assert imported["lines"] == EVENTS and imported["staged"] == EVENTS, imported
            ready_per_hour = new_events_per_hour(engine)
            assert all(ready_per_hour.get(start, 0) > 50 for start, _ in BACKFILLED), ready_per_hour
            assert sum(n for hour, n in ready_per_hour.items() if not RANGE_START <= hour < RANGE_END) > 50
            expected_decisions = one_pass_decisions(tmp_path, config_path, audience, export)
            expected_emails = {
                f"<{delivery_id}@{SENDER_DOMAIN}>"
                for delivery_id, status, _ in expected_decisions
                if status == "pending"
            }
            assert len(expected_emails) > 30, "too few emails to tell anything"
            step(f"imported {EVENTS} events; {len(expected_emails)} emails expected")

            assert migrate.wait(timeout=180) == 0, airflow.log_tail()
            step("metadata database migrated")
            airflow.start("api-server", "scheduler")
            airflow.cli("dags", "reserialize")  # what the dag-processor does, once
            step("DAG serialised")
            airflow.wait_until_healthy()
            dag = wait_for(
                f"{DAG_ID} in the API",
                lambda: airflow.api(f"/dags/{DAG_ID}"),
                60,
                processes=airflow.processes,
                explain=airflow.log_tail,
            )
            assert dag["is_paused"] is False, dag
            step("Airflow up")

            # the backfill, as the README tells the user to run it
            airflow.cli(
                "backfill",
                "create",
                "--dag-id",
                DAG_ID,
                "--from-date",
                _iso(RANGE_START),
                "--to-date",
                _iso(BACKFILLED[-1][0]),
                "--max-active-runs",
                "1",
            )
            runs = wait_for_runs(
                airflow,
                lambda runs: len(runs) == 3 and all(r["state"] == "success" for r in runs.values()),
                "the three backfill runs to succeed",
                150,
            )
            step("three backfill runs succeeded")
            intervals = {
                run_id: (_unix(run["data_interval_start"]), _unix(run["data_interval_end"]))
                for run_id, run in runs.items()
            }
            assert sorted(intervals.values()) == BACKFILLED
            assert {run["run_type"] for run in runs.values()} == {"backfill"}

            # each run decided exactly the events of its hour and sent only their emails ...
            events = rows(engine, "SELECT event_id, time_gmt, status, processed_at FROM pipeline_events")
            for run_id, (start, end) in intervals.items():
                tis = task_instances(airflow, run_id)
                assert {ti["state"] for ti in tis.values()} == {"success"}, tis
                match_started, match_ended = (
                    _unix(tis["match"]["start_date"]),
                    _unix(tis["match"]["end_date"]),
                )
                decided_by_run = {
                    e.event_id
                    for e in events
                    if e.processed_at is not None and match_started <= e.processed_at <= match_ended
                }
                of_hour = {e.event_id for e in events if start <= e.time_gmt < end and e.status != "ignored"}
                assert decided_by_run == of_hour, (
                    f"{run_id}: decided {len(decided_by_run)}, hour has {len(of_hour)}"
                )
                matched = airflow.api(f"{_run_path(run_id)}/taskInstances/match/xcomEntries/return_value")[
                    "value"
                ]
                assert matched["ready"] == ready_per_hour[start] == len(of_hour), (run_id, matched)
                sent_by_run = rows(
                    engine,
                    "SELECT event_time FROM deliveries WHERE status = 'sent' AND claimed_by LIKE :prefix",
                    prefix=f"{run_id}|%",
                )
                counts = run_counts(engine, run_id)
                assert counts["drained"] == 0, counts  # a backfill run never drains the journal
                assert counts["sent"] == len(sent_by_run) > 0, counts
                assert all(start <= sent.event_time < end for sent in sent_by_run), run_id
            # ... the hours either side are untouched ...
            assert {e.status for e in events if not RANGE_START <= e.time_gmt < RANGE_END} == {
                "new",
                "ignored",
            }
            # ... and the hour-by-hour decisions are those of one pass over the range, then sent
            decided = rows(engine, "SELECT delivery_id, status, reason FROM deliveries")
            assert {
                (d.delivery_id, "pending" if d.status == "sent" else d.status, d.reason) for d in decided
            } == expected_decisions

            # every expected email went out, once
            received = smtp.message_ids()
            assert sorted(received) == sorted(expected_emails)
            assert len(rows(engine, "SELECT 1 FROM deliveries WHERE status = 'sent'")) == len(received)

            # the user imports the file again and reruns the middle hour's run (the UI's "Clear
            # run"); its events are made new first, so that the rerun decides them again
            assert cli_import(airflow.env, export)["staged"] == 0
            start, end = BACKFILLED[1]
            (run_id,) = [run_id for run_id, interval in intervals.items() if interval == BACKFILLED[1]]
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE pipeline_events SET status = 'new', processed_at = NULL "
                        "WHERE time_gmt >= :start AND time_gmt < :end AND status != 'ignored'"
                    ),
                    {"start": start, "end": end},
                )
            decided_before = deliveries_snapshot(engine)
            before_rerun = time.time()
            airflow.api(f"{_run_path(run_id)}/clear", {"dry_run": False})
            rerun = wait_for_runs(
                airflow,
                lambda runs: (
                    runs[run_id]["state"] == "success"
                    and _unix(runs[run_id]["end_date"] or "1970-01-01T00:00Z") > before_rerun
                ),
                f"the rerun of {run_id}",
                90,
            )[run_id]
            step("rerun of the middle hour succeeded")
            assert rerun["run_type"] == "backfill"
            counts = run_counts(engine, run_id)
            assert counts["ready"] == ready_per_hour[start] and counts.get("sent", 0) == 0, counts
            assert deliveries_snapshot(engine) == decided_before
            assert smtp.message_ids() == received
        except BaseException:
            print(airflow.log_tail())
            raise
        finally:
            engine.dispose()
    step("Airflow stopped")
