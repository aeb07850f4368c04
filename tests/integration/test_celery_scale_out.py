"""The deliver step spread over two Celery workers, for real (issue 16).

Airflow with the CeleryExecutor: Redis (127.0.0.1:6379) as the broker, PostgreSQL as the metadata
database and the result backend, the api-server, scheduler, dag-processor and two ``airflow celery
worker`` processes (one task at a time each), all started here. A backlog of deliveries waits in a
PostgreSQL staging database; a triggered run maps two deliver tasks (``TRIGGERS_DELIVERY_WORKERS=2``)
that claim from the one queue, under one shared rate limit.

1. Both workers deliver: every email is received once, the report merges both tasks' counts.
2. One worker is SIGKILLed mid-batch (its process group and its task runner's, which Airflow puts in
   a group of its own): every email is still received,
   its claims taken over by the live sibling (same host: its process is gone; elsewhere: after
   ``TRIGGERS_DELIVERY_LEASE``); the emails received twice are counted and stay within the bound,
   the killed worker's sessions x window.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from include.config import DEFAULT_CONFIG_PATH, load_config
from include.database.engine import make_engine
from include.database.schema import deliveries, pipeline_runs
from include.delivery.pool import NEAR_WINDOW
from include.sandbox.demo import airflow_environment
from include.sandbox.keys import create_key_pair
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.server import Simulator
from include.sandbox.smtp_server import LocalSmtpServer
from tests.airflow_harness import AirflowHarness, wait_for
from tests.conftest import PG_ADMIN_URL, _postgres_reason, upgrade_schema
from tests.integration.test_delivery import seed

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REDIS = ("127.0.0.1", 6379)
BACKLOG = 3000
SESSIONS = 4  # per worker (TRIGGERS_SMTP_CONNECTIONS); the window is sized: NEAR_WINDOW on loopback
RATE = 100.0  # emails a second over both workers: the shared limit paces the run (~30 s a backlog)
LEASE = 60.0  # a worker gives its claims back after 30 s, checks for dead ones every 15 s
DOMAINS = [f"shop{i}.example" for i in range(10)]


def _redis_reason() -> str | None:
    try:
        with socket.create_connection(REDIS, timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(64).startswith(b"+PONG"):
                return "Redis at 127.0.0.1:6379 did not answer PING"
    except OSError as error:
        return f"Redis not reachable at 127.0.0.1:6379: {error}"
    return None


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    """Our own PostgreSQL databases: Airflow's metadata, Celery's results, the staging one."""
    reason = _postgres_reason() or _redis_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"scaleout_{kind}_{suffix}" for kind in ("airflow", "celery", "triggers")}
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = make_url(PG_ADMIN_URL)
    try:
        yield {
            kind: base.set(drivername="postgresql+psycopg", database=name).render_as_string(
                hide_password=False
            )
            for kind, name in names.items()
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def smtp() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer() as server:
        server.faults.delay = 0.005  # a little slow, so the run lasts and the kill lands mid-batch
        yield server


SMTP_TIMEOUT = 10.0  # a 60 s lease needs 2 x (SMTP timeout + 7.5 s of commit retries) <= 60 (check_lease)


def _config_file(home: Path) -> Path:
    """The default configuration with the run's shared rate (RATE over both workers)."""
    config_path = home / "triggers.yaml"
    config_text = DEFAULT_CONFIG_PATH.read_text()
    assert "rate: {per_second: 50, per_domain_per_second: 10}" in config_text
    config_path.write_text(
        config_text.replace(
            "rate: {per_second: 50, per_domain_per_second: 10}",
            f"rate: {{per_second: {RATE}, per_domain_per_second: {RATE / 4}}}",
        )
    )
    return config_path


def _environment(
    connections: dict[str, str], databases: dict[str, str], home: Path, queue: str
) -> dict[str, str]:
    """Airflow on the CeleryExecutor (our own queue on the shared Redis), two mapped deliver tasks."""
    smtp_connection = json.loads(connections["AIRFLOW_CONN_SMTP_DEFAULT"])
    smtp_connection.setdefault("extra", {})["timeout"] = SMTP_TIMEOUT
    return {
        "AIRFLOW_CONN_ADOBE_PIPELINE": connections["AIRFLOW_CONN_ADOBE_PIPELINE"],
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp_connection),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": databases["airflow"],
        "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:6379/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{databases['celery']}",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",  # one task a worker: each runs one deliver
        # a killed task is found dead after 15 s (Airflow's default: 5 minutes) and retried
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "TRIGGERS_DB_URL": databases["triggers"],
        "TRIGGERS_CONFIG": str(_config_file(home)),
        "TRIGGERS_SCHEDULE": "0 0 1 1 *",  # no scheduled run in the test: only the triggered ones
        "TRIGGERS_DELIVERY_WORKERS": "2",
        "TRIGGERS_DELIVERY_LEASE": str(LEASE),
        "TRIGGERS_SMTP_CONNECTIONS": str(SESSIONS),
        "TRIGGERS_TOKEN_CACHE": str(home / "token-cache"),
    }


def _start_workers(airflow: AirflowHarness, queue: str) -> list[Any]:
    """Two Celery workers on ``queue``, one task each."""
    return [
        airflow.cli_in_background(
            "celery",
            "worker",
            "--queues",
            queue,
            "--concurrency",
            "1",
            "--celery-hostname",
            f"{queue}-w{i}@%h",
            "--without-mingle",
            "--without-gossip",
        )
        for i in range(2)
    ]


def _ready(airflow: AirflowHarness) -> None:
    """Healthy, the pipeline DAG parsed and unpaused."""
    airflow.wait_until_healthy(180)
    wait_for(
        "triggers_pipeline parsed by the dag-processor",
        lambda: _dag_known(airflow),
        180,
        processes=airflow.processes,
        explain=airflow.log_tail,
    )
    airflow.api("/dags/triggers_pipeline", {"is_paused": False}, method="PATCH")


@pytest.fixture(scope="module")
def celery(
    databases: dict[str, str], smtp: LocalSmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Airflow on the CeleryExecutor with two workers, the pipeline DAG unpaused."""
    home = tmp_path_factory.mktemp("celery")
    private_key, public_key = create_key_pair(home / "keys")
    options = SimulatorOptions(public_key_pem=public_key.read_bytes(), events=0)
    queue = f"scaleout_{uuid.uuid4().hex[:8]}"  # ours alone on the shared Redis
    with Simulator(options) as simulator:
        connections = airflow_environment(home, simulator.url, smtp.port, private_key, options, "")
        env = _environment(connections, databases, home, queue)
        with AirflowHarness(home / "airflow", env=env) as airflow:
            try:
                airflow.cli("db", "migrate", timeout=600)
                airflow.start("api-server", "scheduler", "dag-processor")
                workers = _start_workers(airflow, queue)
                _ready(airflow)
                yield {"airflow": airflow, "workers": workers, "url": databases["triggers"]}
            except BaseException:
                print(airflow.log_tail(12000))
                raise


def _dag_known(airflow: AirflowHarness) -> bool:
    try:
        return airflow.api("/dags/triggers_pipeline").get("is_stale") is False
    except Exception:  # 404 until the dag-processor has stored it
        return False


def _backlog(url: str) -> list[str]:
    """A fresh backlog of BACKLOG pending deliveries (the previous scenario's rows removed),
    recipients spread over DOMAINS; their delivery ids."""
    engine = make_engine(url)
    config = load_config()
    upgrade_schema(engine, config.dimensions)  # as `db upgrade` makes it
    with engine.begin() as conn:
        for table in ("deliveries", "pipeline_events", "recipients"):
            conn.execute(text(f"DELETE FROM {table}"))
    ids = seed(engine, config, [{"email": f"p{i}@{DOMAINS[i % len(DOMAINS)]}"} for i in range(BACKLOG)])
    engine.dispose()
    return ids


def _received_since(smtp: LocalSmtpServer, first: int) -> Counter[str]:
    """The delivery ids of the messages received from the ``first``-th on, with their counts."""
    return Counter((m.message_id or "").strip("<>").split("@")[0] for m in smtp.messages[first:])


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL the worker's process group and the group of every process under it, at once, as a
    machine crash would: Airflow puts each task runner in a process group of its own
    (task-sdk supervisor: ``os.setpgid(0, 0)``), which a kill of the worker's group alone misses
    (the task would go on sending, orphaned). The groups killed."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    groups = sorted({os.getpgid(p.pid) for p in tree if p.is_running()})
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    return groups


def _trigger(airflow: AirflowHarness, run_id: str) -> None:
    airflow.api("/dags/triggers_pipeline/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": {}})


def _run_state(airflow: AirflowHarness, run_id: str) -> str | None:
    state = airflow.api(f"/dags/triggers_pipeline/dagRuns/{run_id}")["state"]
    return state if state in ("success", "failed") else None


def _deliver_tasks(airflow: AirflowHarness, run_id: str) -> list[dict[str, Any]]:
    found = airflow.api(f"/dags/triggers_pipeline/dagRuns/{run_id}/taskInstances")
    return [ti for ti in found["task_instances"] if ti["task_id"] == "deliver"]


def _counts(url: str, run_id: str) -> dict[str, Any]:
    engine = make_engine(url)
    with engine.connect() as conn:
        counts = conn.execute(
            select(pipeline_runs.c.counts).where(pipeline_runs.c.run_id == run_id)
        ).scalar_one()
        statuses = dict(
            conn.execute(select(deliveries.c.status, func.count()).group_by(deliveries.c.status)).all()
        )
    engine.dispose()
    return {"report": json.loads(counts), "statuses": statuses}


def test_two_celery_workers_deliver_one_backlog_each_email_once(celery, smtp: LocalSmtpServer) -> None:
    airflow = celery["airflow"]
    ids = _backlog(celery["url"])
    first = len(smtp.messages)
    started = time.monotonic()
    _trigger(airflow, "manual__two_workers")
    both = wait_for(
        "both mapped deliver tasks running",
        lambda: (
            len([t for t in _deliver_tasks(airflow, "manual__two_workers") if t["state"] == "running"]) == 2
        ),
        240,
        processes=airflow.processes,
        explain=airflow.log_tail,
    )
    assert both
    state = wait_for(
        "the run's end", lambda: _run_state(airflow, "manual__two_workers"), 400, explain=airflow.log_tail
    )
    took = time.monotonic() - started
    received = _received_since(smtp, first)
    found = _counts(celery["url"], "manual__two_workers")
    print(f"2 workers, {len(ids)} emails: run {state} in {took:.0f} s; report {found['report']}")
    assert state == "success", airflow.log_tail()
    assert set(received) == set(ids) and max(received.values()) == 1  # every email, once
    assert found["statuses"] == {"sent": len(ids)}
    report = found["report"]
    assert report["sent"] == len(ids) and report["workers"] == 2 and report.get("lost_claim_race", 0) == 0


def test_a_celery_worker_killed_mid_batch_loses_nothing_and_duplicates_stay_in_the_bound(
    celery, smtp: LocalSmtpServer
) -> None:
    airflow = celery["airflow"]
    ids = _backlog(celery["url"])
    wanted, first = set(ids), len(smtp.messages)

    def received() -> Counter[str]:
        return _received_since(smtp, first)

    _trigger(airflow, "manual__one_killed")
    wait_for(
        "both mapped deliver tasks running and a fifth of the backlog sent",
        lambda: (
            len([t for t in _deliver_tasks(airflow, "manual__one_killed") if t["state"] == "running"]) == 2
            and sum(received().values()) >= BACKLOG // 5
        ),
        240,
        processes=airflow.processes,
        explain=airflow.log_tail,
    )
    victim = celery["workers"][0]
    killed = _kill_tree(victim.pid)
    victim.wait()
    killed_at, killed_wall = time.monotonic(), time.time()
    at_kill = sum(received().values())
    state = wait_for(
        "the run's end", lambda: _run_state(airflow, "manual__one_killed"), 600, explain=airflow.log_tail
    )
    took = time.monotonic() - killed_at
    got = received()
    twice = {k: n for k, n in got.items() if n > 1}
    found = _counts(celery["url"], "manual__one_killed")
    bound = SESSIONS * NEAR_WINDOW
    last = max(m.received_at for m in smtp.messages[first:]) - killed_wall
    report = found["report"]
    print(
        f"killed one worker ({len(killed)} process groups) with {at_kill}/{BACKLOG} received; "
        f"the run ended {state} {took:.0f} s later; "
        f"received twice: {len(twice)} (bound {SESSIONS} sessions x window {NEAR_WINDOW} = {bound}); "
        f"last email {last:.0f} s after the kill; requeued {report.get('requeued_interrupted', 0)}; "
        f"tasks: {[(t['map_index'], t['state'], t['try_number']) for t in _deliver_tasks(airflow, 'manual__one_killed')]}"
    )
    assert set(got) == wanted  # every email still sent
    assert max(got.values()) <= 2 and len(twice) <= bound
    assert found["statuses"] == {"sent": len(ids)} and report.get("requeued_interrupted", 0) > 0
    assert state == "success", airflow.log_tail()
