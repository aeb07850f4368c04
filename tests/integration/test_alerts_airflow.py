"""Alerts and metrics under a real scheduler (not `airflow dags test`: the scheduler is what
evaluates Deadline Alerts, and the dag-processor runs a DAG's on_failure_callback).

One run of triggers_pipeline with a 1-second deadline and no Adobe connection: it cannot finish
within a second (so the Deadline Alert's callback runs on the executor) and it ends failed (its
authenticate task fails; so the on_failure_callback runs). Both notifications must reach the
local SMTP server through `smtp_default`. The report task still runs and its metrics must reach a
real StatsD listener (a UDP socket here) through Airflow's `[metrics]` settings."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from include.config import DEFAULT_CONFIG_PATH, load_config
from include.database.engine import make_engine
from include.sandbox.smtp_server import LocalSmtpServer
from tests.airflow_harness import AirflowHarness, wait_for
from tests.conftest import upgrade_schema

pytestmark = pytest.mark.slow
DAG_ID = "triggers_pipeline"
ONCALL = "oncall@example.com"


class StatsdListener:
    """A UDP socket that keeps every StatsD line it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self.sock.recv(65535)
            except TimeoutError:
                continue
            self.lines.extend(datagram.decode(errors="replace").splitlines())

    def __enter__(self) -> StatsdListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _staging_with_alerts(tmp_path):
    """The shipped configuration plus an ``alerts:`` section, and a staging database at its schema."""
    config = tmp_path / "triggers.yaml"
    config.write_text(
        DEFAULT_CONFIG_PATH.read_text()
        + f"alerts:\n  email: [{ONCALL}]\n  run_deadline: 1s\n  on_failure: true\n  max_lag: 1h\n"
    )
    staging_url = f"sqlite:///{tmp_path / 'triggers.db'}"
    engine = make_engine(staging_url)
    upgrade_schema(engine, load_config(config).dimensions)
    engine.dispose()
    return config, staging_url


def _airflow_env(tmp_path, config, staging_url: str, smtp_port: int, statsd_port: int) -> dict[str, str]:
    smtp = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": smtp_port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.com"},
    }
    return {
        "TRIGGERS_DB_URL": staging_url,
        "TRIGGERS_CONFIG": str(config),
        "TRIGGERS_SCHEDULE": "0 0 1 1 *",  # no scheduled run: only the one triggered here
        "TRIGGERS_TOKEN_CACHE": str(tmp_path / "token-cache"),
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd_port),
    }


def _scrape_metrics(airflow: AirflowHarness) -> tuple[dict, int]:
    """The Prometheus endpoint the api-server serves beside the status view, signed in; and the
    status code it answers an anonymous request."""
    request = urllib.request.Request(
        f"{airflow.base_url}/triggers/metrics", headers={"Authorization": f"Bearer {airflow.api_token()}"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        scraped = {
            (s.name, tuple(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.read().decode())
            for s in family.samples
        }
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{airflow.base_url}/triggers/metrics", timeout=20)
    return scraped, refused.value.code


def _assert_statsd(lines: list[str]) -> None:
    """Every metric of the module's table reached StatsD, each of its kind (g, c)."""
    ours = [line for line in lines if ".triggers." in line]
    received = {line.split(":")[0].removeprefix("airflow.") for line in ours}
    assert {
        "triggers.events.received",
        "triggers.events.staged",
        "triggers.events.quarantined",
        "triggers.events.ignored",
        "triggers.events.matched",
        "triggers.emails.sent",
        "triggers.emails.failed",
        "triggers.emails.retried",
        "triggers.journal.retried_requests",
        "triggers.lag_seconds",
        "triggers.send_rate",
    } <= received, ours
    kinds = {
        line.split(":")[0]: (float(line.split(":")[1].split("|")[0]), line.split("|")[1]) for line in ours
    }
    assert kinds["airflow.triggers.lag_seconds"] == (0.0, "g")
    assert kinds["airflow.triggers.send_rate"] == (0.0, "g")
    assert kinds["airflow.triggers.events.received"] == (0.0, "c"), ours  # nothing drained: no connection


def test_a_late_failing_run_alerts_by_email_and_its_metrics_reach_statsd(tmp_path):
    config, staging_url = _staging_with_alerts(tmp_path)
    with (
        LocalSmtpServer() as smtp,
        StatsdListener() as statsd,
        AirflowHarness(
            tmp_path / "airflow", env=_airflow_env(tmp_path, config, staging_url, smtp.port, statsd.port)
        ) as airflow,
    ):
        airflow.cli("db", "migrate", timeout=300)
        airflow.start("api-server", "scheduler", "dag-processor")
        airflow.wait_until_healthy()
        wait_for(
            f"{DAG_ID} in the API", lambda: airflow.api(f"/dags/{DAG_ID}"), 120, explain=airflow.log_tail
        )
        run = airflow.api(f"/dags/{DAG_ID}/dagRuns", {"logical_date": None})
        run_path = f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"

        def alerts() -> list:
            return [m for m in smtp.messages if ONCALL in m.rcpt_tos]

        def failed() -> bool:
            return airflow.api(run_path)["state"] == "failed"

        wait_for("the run to fail", failed, 240, processes=airflow.processes, explain=airflow.log_tail)
        wait_for(
            "two alerts",
            lambda: len(alerts()) >= 2,
            120,
            processes=airflow.processes,
            explain=airflow.log_tail,
        )
        time.sleep(1)  # a late duplicate would show
        subjects = sorted(m["Subject"] for m in alerts())
        bodies = [m.message.get_body(("html",)).get_content() for m in alerts()]
        scraped, anonymous = _scrape_metrics(airflow)
        state_of = {
            ti["task_id"]: ti["state"] for ti in airflow.api(f"{run_path}/taskInstances")["task_instances"]
        }

    run_id = run["dag_run_id"]
    assert subjects == [
        f"{DAG_ID} run {run_id} failed",
        f"{DAG_ID} run {run_id} has not finished 1 s after it was queued",
    ], subjects
    assert anonymous == 401  # signed-in like the status view
    assert scraped[("triggers_run_events", (("kind", "received"),))] == 0
    assert ("triggers_run_finished_timestamp_seconds", ()) in scraped
    link = f"{airflow.base_url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}"
    assert all(link in body for body in bodies), bodies  # each alert links to the run in the UI
    assert state_of["authenticate"] == "failed" and state_of["report"] == "success", state_of
    _assert_statsd(statsd.lines)
