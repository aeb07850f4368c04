"""``./run demo``: the whole job once, on embedded defaults, and what it did.

Starts the pipeline simulator and the local SMTP server on loopback, creates a key pair and the
two connections, loads an audience that matches the simulator's shoppers, runs
``airflow dags test triggers_pipeline`` against a SQLite database in ``var/``, and prints what
was staged, decided and sent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from include.config import PROJECT_DIR, load_config
from include.database.engine import make_engine
from include.database.schema import deliveries, events_table

VAR = PROJECT_DIR / "var" / "demo"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))  # the CLI of this interpreter's environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=5_000, help="events the simulator publishes")
    parser.add_argument("--people", type=int, default=2_000, help="shoppers (and recipients)")
    parser.add_argument("--keep", action="store_true", help="keep the database of an earlier demo")


def airflow_environment(
    workdir: Path, simulator_url: str, smtp_port: int, private_key: Path, options, db_url: str
) -> dict[str, str]:
    """The environment of an Airflow command run against the simulator and a local SMTP server."""
    from include.sandbox.keys import connection_json

    airflow_home = workdir / "airflow"
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_DIR / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_DIR / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW_CONN_ADOBE_PIPELINE": connection_json(
            host=simulator_url,
            client_id=options.client_id,
            client_secret=options.client_secret,
            org_id=options.org_id,
            technical_account_id=options.technical_account_id,
            private_key_path=str(private_key),
            ims_url=simulator_url,
        ),
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": smtp_port,
                "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "shop@example.com"},
            }
        ),
        "TRIGGERS_DB_URL": db_url,
        "TRIGGERS_TOKEN_CACHE": str(workdir / "token-cache"),
        "PYTHONPATH": str(PROJECT_DIR),
    }


def main(args: argparse.Namespace) -> int:
    from include.audience.load import load_recipients
    from include.operations.database import upgrade_database
    from include.sandbox.keys import create_key_pair
    from include.sandbox.simulator.options import SimulatorOptions
    from include.sandbox.simulator.population import write_audience_csv
    from include.sandbox.simulator.server import Simulator
    from include.sandbox.smtp_server import LocalSmtpServer

    VAR.mkdir(parents=True, exist_ok=True)
    database = VAR / "triggers.db"
    if not args.keep:
        for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            leftover.unlink(missing_ok=True)
    db_url = f"sqlite:///{database}"
    keys = VAR / "keys"
    private_key, public_key = keys / "private.pem", keys / "public.pem"
    if not (private_key.exists() and public_key.exists()):
        private_key, public_key = create_key_pair(keys)
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=args.events,
        people=args.people,
        malformed_share=0.01,
        duplicate_share=0.01,
        time_span=7200.0,
        start_time=time.time() - 3 * 3600,
    )
    step = _step_printer()
    with Simulator(options) as simulator, LocalSmtpServer(maildir=VAR / "mail") as smtp:
        step(
            f"pipeline simulator at {simulator.url} with {args.events:,} events; SMTP server on 127.0.0.1:{smtp.port}"
        )
        audience_csv = VAR / "audience.csv"
        write_audience_csv(audience_csv, args.people)
        engine = make_engine(db_url)
        schema = upgrade_database(engine, load_config().dimensions)
        step(f"staging database {database.relative_to(PROJECT_DIR)} at schema {schema.revision} (db upgrade)")
        loaded = load_recipients(engine, audience_csv)
        step(f"audience loaded from {audience_csv.relative_to(PROJECT_DIR)}: {loaded}")
        environment = airflow_environment(VAR, simulator.url, smtp.port, private_key, options, db_url)
        if not (VAR / "airflow" / "airflow.db").exists():
            step("initialising Airflow's metadata database (once)")
            subprocess.run([AIRFLOW, "db", "migrate"], env=environment, check=True, stdout=subprocess.DEVNULL)
        step("airflow dags test triggers_pipeline")
        started = time.monotonic()
        run = subprocess.run(
            [AIRFLOW, "dags", "test", "triggers_pipeline"], env=environment, capture_output=True, text=True
        )
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            step(f"the DAG run failed (exit {run.returncode}); its output is above")
            return run.returncode
        step(f"DAG run finished in {time.monotonic() - started:.1f} s")
        _print_summary(engine, smtp)
    return 0


def _step_printer():
    started = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    return step


def _print_summary(engine, smtp) -> None:
    table = events_table()
    with engine.connect() as conn:
        events = conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all()
        decisions = conn.execute(
            select(deliveries.c.status, deliveries.c.reason, func.count())
            .group_by(deliveries.c.status, deliveries.c.reason)
            .order_by(func.count().desc())
        ).all()
    print("\nStaged events (pipeline_events):")
    for status, count in sorted(events):
        print(f"  {status:<12} {count:>8,}")
    print("Decisions (deliveries):")
    for status, reason, count in decisions:
        print(f"  {status:<12} {reason or '':<28} {count:>8,}")
    print(f"Emails received by the local SMTP server: {len(smtp.messages):,}")
    if smtp.messages:
        message = smtp.messages[0]
        print(
            f"  e.g. To: {message['To']} | Subject: {message['Subject']} | Message-ID: {message['Message-ID']}"
        )
    print(
        f"\nEverything is in {VAR.relative_to(PROJECT_DIR)}/ (triggers.db, mail/); run again to see that "
        "nothing is sent twice: ./run demo --keep"
    )
