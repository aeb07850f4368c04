"""The Airflow UI in a real browser: sign in, the purge DAG's grid, the "Triggers status" view.

Airflow runs as a person would run it locally (``airflow db migrate``, ``airflow dags test
triggers_purge``, ``airflow api-server``) on loopback with a temporary ``AIRFLOW_HOME``, a SQLite metadata
database and the simple auth manager with a known admin password; the project's ``dags/`` and
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
from include.database.schema import deliveries, pipeline_runs, pipeline_state
from include.database.sql import bulk_write
from tests.airflow_harness import AirflowHarness, wait_for
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# TRIGGERS_SCREENSHOTS=docs/screenshots refreshes the README's pictures; by default they go to a
# temporary folder, so that a test run leaves the checkout as it was
SCREENSHOTS = Path(os.environ.get("TRIGGERS_SCREENSHOTS") or tempfile.mkdtemp(prefix="triggers-screenshots-"))
VENV_BIN = Path(sys.executable).parent
HOUR = 3600

pytestmark = pytest.mark.slow


# --- a small, known pipeline history ------------------------------------------------------------


def _seed_staging(url: str, now: float) -> dict[str, int]:
    """Three days of events with a daily rhythm, some emails and runs; returns what the page must show."""
    engine = make_engine(url)
    table = upgrade_schema(engine, load_config().dimensions)  # the configuration the DAGs load
    start_hour = int(now) // HOUR - 71
    rows, number = [], 0
    for offset in range(72):
        hour = (start_hour + offset) * HOUR
        count = int(160 + 140 * math.sin((offset % 24 - 9) / 24 * 2 * math.pi))
        for i in range(count):
            received = hour + (i * 3599 / count)
            if received >= now:
                break
            status = "new" if received > now - 40 else ("matched", "unmatched", "matched", "ignored")[i % 4]
            processed = None if status in ("new", "ignored") else received + 1.5
            rows.append(
                (
                    f"e{number}",
                    f"p{number}",
                    "customer_dev",
                    "3e8a2ba7",
                    received - 20,
                    received,
                    status,
                    processed,
                    "{}",
                )
            )
            number += 1
    emails = [
        (
            f"d{i}",
            "cart_abandonment",
            f"r{i}",
            f"r{i}@example.com",
            f"e{i}",
            now - HOUR,
            now - HOUR,
            status,
            reason,
            1,
        )
        for i, (status, reason) in enumerate(
            [("sent", None)] * 25 + [("failed", None)] * 2 + [("suppressed", "opted_out")] * 3
        )
    ]
    with engine.begin() as conn:
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
                "processed_at",
                "payload",
            ],
            rows,
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
                    f"p{number - 1}",
                    "http://127.0.0.1:8765",
                    now - 12,
                    number + 40,
                    0,
                    number // 4,
                    40,
                    3,
                )
            ],
        )
        bulk_write(
            conn,
            deliveries,
            [
                "delivery_id",
                "campaign_id",
                "recipient_id",
                "email",
                "event_id",
                "event_time",
                "decided_at",
                "status",
                "reason",
                "attempts",
            ],
            emails,
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
    return {"received": number + 40, "sent": 25, "failed": 2}


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
    with AirflowHarness(home, env={"TRIGGERS_DB_URL": staging_url}) as harness:
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
                "base": harness.base_url,
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


def test_triggers_status_view_in_the_airflow_ui(airflow: dict[str, Any], browser: Browser) -> None:
    expected = airflow["expected"]
    browser.open(f"{airflow['base']}/plugin/triggers-status")
    text = browser.wait_for_text(IFRAME_TEXT, "Triggers status", "customer_dev", "Events received per hour")
    assert f"{expected['received']:,}" in text
    assert re.search(rf"{expected['sent']}\s+Sent", text), text
    assert re.search(rf"{expected['failed']}\s+Failed", text), text
    assert "http://127.0.0.1:8765" in text and "scheduled__1" in text
    bars = browser.evaluate(
        "Array.from(document.querySelector('iframe').contentDocument.querySelectorAll('#events-chart rect'))"
        ".map(bar => bar.getBoundingClientRect().height)"
    )
    assert len(bars) == 72 and sum(1 for height in bars if height > 1) >= 70  # drawn, not just present
    nav = browser.evaluate(
        "document.querySelector('nav') ? document.querySelector('nav').innerText : document.body.innerText"
    )
    assert "Triggers status" in nav
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 500))")
    browser.screenshot(SCREENSHOTS / "airflow-triggers-status.png")


def test_the_trigger_form_of_the_pipeline_shows_its_params(airflow: dict[str, Any], browser: Browser) -> None:
    harness = airflow["harness"]
    harness.cli("dags", "reserialize")  # the pipeline DAG into the metadata database (no dag-processor)

    def pipeline_known() -> bool:
        try:
            return harness.api("/dags/triggers_pipeline").get("is_stale") is False
        except Exception:  # 404 until it is serialized
            return False

    wait_for("triggers_pipeline in the DAG list", pipeline_known, 60, explain=harness.log_tail)
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
