"""The Airflow UI in a real browser: sign in, the purge DAG's grid, the "Triggers status" view.

Airflow runs as a person would run it locally (``airflow db migrate``, ``airflow dags test
triggers_purge``, ``airflow api-server``) on loopback with a temporary ``AIRFLOW_HOME``, a SQLite metadata
database, served under a sub-path (``[api] base_url`` = ``http://127.0.0.1:PORT/airflow/``, as behind a
reverse proxy), and the simple auth manager with a known admin password and a user whose role is
empty (signed in, may read no DAG); the project's ``dags/`` and
``plugins/`` folders; a staging database seeded with a pipeline history. Headless Chromium is
driven over the DevTools protocol with the ``websockets`` package. Screenshots land in
``$TRIGGERS_SCREENSHOTS`` (``docs/screenshots/`` refreshes the README's), else a temporary folder.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from include.config import load_config
from include.database.engine import make_engine
from include.database.hourly import add_counts
from include.database.schema import deliveries, pipeline_runs, pipeline_state
from include.database.sql import bulk_write
from include.sandbox.net import free_port
from tests.airflow_harness import AirflowHarness, wait_for
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SUB_PATH = "/airflow"
NOBODY_PASSWORD = "nobody-may-read-no-dag"
# TRIGGERS_SCREENSHOTS=docs/screenshots refreshes the README's pictures; by default they go to a
# temporary folder, so that a test run leaves the checkout as it was
SCREENSHOTS = Path(os.environ.get("TRIGGERS_SCREENSHOTS") or tempfile.mkdtemp(prefix="triggers-screenshots-"))
VENV_BIN = Path(sys.executable).parent
HOUR = 3600

pytestmark = pytest.mark.slow


# --- a small, known pipeline history ------------------------------------------------------------


def _seed_staging(url: str, now: float) -> dict[str, Any]:
    """Three days of counts with a daily rhythm (as the writers keep them), some emails and runs;
    returns what the page must show."""
    engine = make_engine(url)
    table = upgrade_schema(engine, load_config().dimensions)  # the configuration the DAGs load
    this_hour = int(now) // HOUR * HOUR
    received = 0
    with engine.begin() as conn:
        for offset in range(72):
            hour = this_hour - (71 - offset) * HOUR
            count = int(160 + 140 * math.sin((offset % 24 - 9) / 24 * 2 * math.pi))
            staged = {"received": count, "staged": count, "matched": count // 2, "unmatched": count // 4}
            staged |= {
                "ignored": count // 4,
                "processed": count * 3 // 4,
                "processing_ms": count * 3 // 4 * 1500,
            }
            add_counts(conn, hour, {("", name): n for name, n in staged.items()})
            received += count
        add_counts(conn, this_hour, {**CART_LAST_HOUR, **BROWSE_LAST_HOUR})
        add_counts(
            conn,
            this_hour - 5 * HOUR,
            {("cart_abandonment", "decided"): 40, ("cart_abandonment", "sent"): 38},
        )
        bulk_write(
            conn,
            table,
            [
                "event_id",
                "position",
                "consumer",
                "trigger_id",
                "time_gmt",
                "received_at",
                "status",
                "payload",
            ],
            [
                (f"e{i}", f"p{i}", "customer_dev", "3e8a2ba7", now - 50, now - 30, "new", "{}")
                for i in range(4)
            ],
        )
        bulk_write(
            conn,
            pipeline_state,
            [
                "consumer",
                "position",
                "pipeline_host",
                "last_fetch_at",
                "events_received",
                "events_quarantined",
                "events_ignored",
                "events_duplicate",
                "requests_retried",
            ],
            [
                (
                    "customer_dev",
                    "p3",
                    "http://127.0.0.1:8765",
                    now - 12,
                    received + 40,
                    0,
                    received // 4,
                    40,
                    3,
                )
            ],
        )
        bulk_write(
            conn,
            deliveries,
            ["delivery_id", "campaign_id", "event_id", "event_time", "decided_at", "status", "attempts"],
            [(f"d{i}", "cart_abandonment", f"e{i}", now, now, "pending", 0) for i in range(3)],
        )
        bulk_write(
            conn,
            pipeline_runs,
            ["run_id", "started_at", "finished_at", "counts", "lag_seconds"],
            [
                (
                    f"scheduled__{i}",
                    now - 60 * i - 55,
                    now - 60 * i - 50,
                    json.dumps({"drained": 210, "matched": 105, "sent": 8}),
                    4.0,
                )
                for i in range(1, 4)
            ],
        )
    engine.dispose()
    return {"received": received + 40, "sent": 11 + 2 + 38, "failed": 1}


CART_LAST_HOUR = {
    ("cart_abandonment", "decided"): 14,
    ("cart_abandonment", "sent"): 11,
    ("cart_abandonment", "suppressed_opted_out"): 2,
    ("cart_abandonment", "failed"): 1,
}
BROWSE_LAST_HOUR = {("browse_abandonment", "decided"): 3, ("browse_abandonment", "sent"): 2}


# --- Airflow ------------------------------------------------------------------------------------


def _http_json(url: str, token: str | None = None, data: dict | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(data).encode() if data is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not CHROMIUM.exists():
        print(f"skipping: no Chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    home = tmp_path_factory.mktemp("airflow_home")
    staging_url = f"sqlite:///{home / 'triggers.db'}"
    now = time.time()
    expected = _seed_staging(staging_url, now)
    port = free_port()
    served = f"http://127.0.0.1:{port}{SUB_PATH}"  # Airflow behind a sub-path, as behind a proxy
    env = {
        "TRIGGERS_DB_URL": staging_url,
        "AIRFLOW__API__BASE_URL": f"{served}/",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{served}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,nobody:",  # nobody: no role
    }
    with AirflowHarness(home, env=env, port=port) as harness:
        harness.base_url = served  # the harness's own API calls go through the sub-path too
        (home / "passwords.json").write_text(
            json.dumps({"admin": harness.password, "nobody": NOBODY_PASSWORD})
        )
        harness.cli("db", "migrate")
        harness.start("api-server")
        try:
            # meanwhile, one real run of the purge DAG so the grid has something to show; it also
            # parses the dags folder into the metadata database, the dag-processor's job
            harness.cli("dags", "test", "triggers_purge")
            harness.wait_until_healthy(60)
            wait_for(
                "triggers_purge in the DAG list",
                lambda: harness.api("/dags/triggers_purge").get("is_stale") is False,
                60,
                processes=harness.processes,
                explain=harness.log_tail,
            )
            token = harness.api_token()
            yield {
                "base": served,
                "staging_url": staging_url,
                "password": harness.password,
                "token": token,
                "expected": expected,
                "now": now,
                "harness": harness,
            }
        except BaseException:
            print(harness.log_tail(5000))
            raise


# --- Chromium over the DevTools protocol --------------------------------------------------------


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path, width: int = 1440, height: int = 1200) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        endpoint = self._devtools_endpoint()
        targets = wait_for(
            "a Chromium page",
            lambda: [t for t in _http_json(f"{endpoint}/json/list") if t["type"] == "page"],
            20,
        )
        self.socket = connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.next_id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _devtools_endpoint(self) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.process.stderr:
                match = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
                if match and not found:
                    found.append(f"http://{match.group(1)}")

        threading.Thread(target=read, daemon=True).start()  # keeps draining stderr afterwards
        return wait_for("Chromium's DevTools endpoint", lambda: found and found[0], 20)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for_text(self, expression: str, *needles: str, timeout: float = 30) -> str:
        """Poll ``expression`` (a JS string) until it contains every needle; return it."""

        def check() -> str | None:
            text = (
                self.evaluate(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return ''; }} }})()")
                or ""
            )
            return text if all(needle in text for needle in needles) else None

        try:
            return wait_for(f"{needles} in the page", check, timeout)
        except AssertionError:
            print("page text:", self.evaluate("document.body ? document.body.innerText : ''"))
            raise

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def browser(airflow: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    profile = tmp_path_factory.mktemp("chromium_profile")
    browser = Browser(profile)
    try:
        yield browser
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)


IFRAME_TEXT = "document.querySelector('iframe').contentDocument.body.innerText"


def test_sign_in_then_the_purge_dag_grid(airflow: dict[str, Any], browser: Browser) -> None:
    base = airflow["base"]
    browser.open(f"{base}/dags/triggers_purge")
    browser.wait_for_text("document.body.innerText", "Username", "Password")  # the sign-in page
    for name, value in (("username", "admin"), ("password", airflow["password"])):
        browser.evaluate(f"document.querySelector('input[name={name}]').focus()")
        browser.send("Input.insertText", text=value)
    browser.evaluate("document.querySelector('button[type=submit]').click()")

    text = browser.wait_for_text(
        "document.body.innerText", "triggers_purge", "Triggers status", "purge_expired_rows"
    )
    assert "maintenance" in text  # a tag of the DAG
    assert "Sign in" not in text
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 1500))")  # the grid's bars settle
    browser.screenshot(SCREENSHOTS / "airflow-dag-triggers-purge.png")


def _pipeline_serialized(harness: AirflowHarness) -> None:
    harness.cli("dags", "reserialize")  # the pipeline DAG into the metadata database (no dag-processor)

    def pipeline_known() -> bool:
        try:
            return harness.api("/dags/triggers_pipeline").get("is_stale") is False
        except Exception:  # 404 until it is serialized
            return False

    wait_for("triggers_pipeline in the DAG list", pipeline_known, 60, explain=harness.log_tail)


def test_triggers_status_view_in_the_airflow_ui(airflow: dict[str, Any], browser: Browser) -> None:
    """The view inside the UI under the sub-path: figures, the per-campaign breakdown, each run's
    Took, and a run's link that opens its DAG run page in the UI."""
    expected = airflow["expected"]
    _record_a_real_run(airflow)
    browser.open(f"{airflow['base']}/plugin/triggers-status")
    text = browser.wait_for_text(
        IFRAME_TEXT,
        "Triggers status",
        "customer_dev",
        "Events received per hour",
        "Per campaign",
        "manual__status-link",
    )
    assert f"{expected['received']:,}" in text
    assert re.search(rf"{expected['sent']}\s+Sent", text), text
    assert re.search(rf"{expected['failed']}\s+Failed", text), text
    assert "http://127.0.0.1:8765" in text and "scheduled__1" in text
    frame = "document.querySelector('iframe').contentDocument"
    assert browser.evaluate(f"{frame}.location.pathname") == f"{SUB_PATH}/triggers/status"
    _assert_campaigns_runs_and_chart(browser, frame)
    nav = browser.evaluate(
        "document.querySelector('nav') ? document.querySelector('nav').innerText : document.body.innerText"
    )
    assert "Triggers status" in nav
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 500))")
    browser.screenshot(SCREENSHOTS / "airflow-triggers-status.png")
    browser.evaluate(f"{frame}.getElementById('campaigns-last-hour').scrollIntoView()")
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 300))")
    browser.screenshot(SCREENSHOTS / "triggers-status-campaigns-and-runs.png")
    _follow_the_run_link(browser, frame)
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 1000))")
    browser.screenshot(SCREENSHOTS / "triggers-status-run-link.png")


def _record_a_real_run(airflow: dict[str, Any]) -> None:
    """A real run (queued: no scheduler here) and its record in pipeline_runs, for the view to link to."""
    harness = airflow["harness"]
    _pipeline_serialized(harness)
    run = harness.api(
        "/dags/triggers_pipeline/dagRuns", {"dag_run_id": "manual__status-link", "logical_date": None}
    )
    engine = make_engine(airflow["staging_url"])
    with engine.begin() as conn:
        counts = json.dumps({"drained": 12, "sent": 3})
        started = airflow["now"] - 30
        bulk_write(
            conn,
            pipeline_runs,
            ["run_id", "started_at", "finished_at", "counts", "lag_seconds"],
            [(run["dag_run_id"], started, started + 7.5, counts, 1.0)],
        )
    engine.dispose()


def _assert_campaigns_runs_and_chart(browser: Browser, frame: str) -> None:
    """The per-campaign tables, each run's Took and the chart's 72 bars, as the browser draws them."""
    last_hour = browser.evaluate(f"{frame}.getElementById('campaigns-last-hour').innerText")
    assert re.search(r"cart_abandonment\s+14\s+11\s+2\s+opted_out 2\s+1\s+0", last_hour), last_hour
    assert re.search(r"browse_abandonment\s+3\s+2\s+0\s+0\s+0", last_hour), last_hour
    last_day = browser.evaluate(f"{frame}.getElementById('campaigns-last-day').innerText")
    assert re.search(r"cart_abandonment\s+54\s+49", last_day), last_day
    took = browser.evaluate(
        f"Array.from({frame}.querySelectorAll('#recent-runs td.took')).map(td => td.innerText)"
    )
    assert took[0] == "7.5 s" and took[1:] == ["5.0 s"] * 3, took
    bars = browser.evaluate(
        f"Array.from({frame}.querySelectorAll('#events-chart rect')).map(bar => bar.getBoundingClientRect().height)"
    )
    assert len(bars) == 72 and sum(1 for height in bars if height > 1) >= 70  # drawn, not just present


def _follow_the_run_link(browser: Browser, frame: str) -> None:
    """The recorded run's link opens its DAG run page in the UI itself, not nested."""
    link = browser.evaluate(f"{frame}.querySelector('#recent-runs a.dag-run').getAttribute('href')")
    assert link == f"{SUB_PATH}/dags/triggers_pipeline/runs/manual__status-link"
    browser.evaluate(f"{frame}.querySelector('#recent-runs a.dag-run').click()")
    wait_for(
        "the DAG run page",
        lambda: browser.evaluate("location.pathname") == link or None,
        20,
    )
    browser.wait_for_text("document.body.innerText", "manual__status-link", "triggers_pipeline")
    assert browser.evaluate("document.querySelector('iframe') === null")  # the UI's own page, not nested


def test_the_trigger_form_of_the_pipeline_shows_its_params(airflow: dict[str, Any], browser: Browser) -> None:
    _pipeline_serialized(airflow["harness"])
    browser.open(f"{airflow['base']}/dags/triggers_pipeline")
    browser.wait_for_text("document.body.innerText", "triggers_pipeline", "Trigger")
    browser.evaluate(
        "Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'Trigger').click()"
    )
    text = browser.wait_for_text(
        "document.body.innerText", "Dry run", "Max events drained", "Max messages sent", timeout=30
    )
    assert "Decide and render" in text  # the param's description
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 800))")
    browser.screenshot(SCREENSHOTS / "trigger-form.png")


def test_status_page_refuses_an_anonymous_visitor(airflow: dict[str, Any]) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{airflow['base']}/triggers/status.json", timeout=10)
    assert refused.value.code == 401
    status = _http_json(f"{airflow['base']}/triggers/status.json", airflow["token"])
    assert status["events"]["received"] == airflow["expected"]["received"]


def test_status_needs_read_permission_on_the_pipeline_dag(airflow: dict[str, Any]) -> None:
    """A user signed in through the real api-server (a token of its own) whose role may read no
    DAG gets 403 from the view and its JSON; the admin gets the figures."""
    base = airflow["base"]
    token = _http_json(f"{base}/auth/token", data={"username": "nobody", "password": NOBODY_PASSWORD})[
        "access_token"
    ]
    for path in ("/triggers/status.json", "/triggers/status"):
        request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        assert "triggers_pipeline" in refused.value.read().decode()
    assert _http_json(f"{base}/triggers/status.json", airflow["token"])["consumer"] == "customer_dev"
