"""The status figures (include/operations/status.py) and the Airflow UI view that shows them
(plugins/triggers_status.py), on SQLite and PostgreSQL: counts per hour written as the writers
write them (include/database/hourly.add_counts), the present read from rows written with
db.bulk_write. The writers' own counting: tests/integration/test_hourly_counts.py."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from include.database.hourly import NO_CAMPAIGN, add_counts, hour_number
from include.database.schema import deliveries, pipeline_runs, pipeline_state
from include.database.sql import bulk_write
from include.matching.writer import DELIVERY_COLUMNS
from include.operations.status import pipeline_status
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = "customer_dev"  # the default configuration's consumer
NOW = 1_767_225_600.0 + 1800  # 2026-01-01 00:30:00 UTC
HOUR = 3600.0
THIS_HOUR = NOW - 1800
CHART_START = THIS_HOUR - 71 * HOUR  # 72 hourly buckets, the current hour last
EVENT_COLUMNS = [
    "event_id",
    "position",
    "consumer",
    "trigger_id",
    "time_gmt",
    "received_at",
    "status",
    "reason",
    "processed_at",
    "payload",
]
CART, BROWSE = "cart_abandonment", "browse_abandonment"


def _event(n: int, status: str, received_at: float, consumer: str = CONSUMER) -> tuple[Any, ...]:
    return (
        f"{consumer}-{n}",
        f"p{n}",
        consumer,
        "3e8a2ba7",
        received_at - 30,
        received_at,
        status,
        None,
        None,
        "{}",
    )


def _counts(**named: int) -> dict[tuple[str, str], int]:
    return {(NO_CAMPAIGN, name): n for name, n in named.items()}


def seed(engine: Engine) -> None:
    """A small, known pipeline history; the expected figures are in the tests below."""
    table = upgrade_schema(engine)
    with engine.begin() as conn:
        # what the writers counted, hour by hour (several batches add to one hour)
        add_counts(conn, THIS_HOUR + 10, _counts(received=3, staged=3))
        add_counts(conn, THIS_HOUR + 20, _counts(received=4, staged=2, quarantined=1))  # 2 duplicates
        add_counts(conn, THIS_HOUR - HOUR + 5, _counts(received=60, staged=60, matched=50, unmatched=10))
        add_counts(conn, THIS_HOUR - HOUR + 9, _counts(processed=60, processing_ms=120_000))
        add_counts(
            conn, THIS_HOUR - 2 * HOUR, _counts(staged=40, ignored=7, processed=40, processing_ms=160_000)
        )
        add_counts(conn, THIS_HOUR - 30 * HOUR, _counts(staged=9, processed=1, processing_ms=3_600_000))
        add_counts(conn, CHART_START, _counts(staged=2, quarantined=2))  # the chart's first hour
        add_counts(conn, CHART_START - 1, _counts(staged=1000))  # before the chart
        add_counts(
            conn, THIS_HOUR + 30, {(CART, "decided"): 5, (CART, "sent"): 3, (CART, "suppressed_opted_out"): 2}
        )
        add_counts(
            conn, THIS_HOUR - HOUR + 1, {(CART, "decided"): 4, (CART, "failed"): 1, (BROWSE, "sent"): 1}
        )
        add_counts(conn, THIS_HOUR - 3 * HOUR, {(BROWSE, "decided"): 20, (BROWSE, "suppressed_dedupe"): 1})
        add_counts(conn, THIS_HOUR - 40 * HOUR, {(BROWSE, "sent"): 100, (BROWSE, "bounced"): 2})
        bulk_write(conn, table, EVENT_COLUMNS, [_event(300 + i, "new", NOW - 90 + i) for i in range(5)])
        bulk_write(conn, table, EVENT_COLUMNS, [_event(399, "new", NOW - 80 * HOUR)])  # stuck for days
        bulk_write(
            conn,
            table,
            EVENT_COLUMNS,
            [_event(600 + i, "new", NOW - 99, consumer="another") for i in range(4)],
        )
        state_columns = [
            "consumer",
            "position",
            "pipeline_host",
            "last_fetch_at",
            "events_received",
            "events_quarantined",
            "events_ignored",
            "events_duplicate",
            "requests_retried",
        ]
        state = [(CONSUMER, "p304", "https://client:s3cret@pipeline.example:8443", NOW - 5, 130, 3, 7, 10, 2)]
        bulk_write(conn, pipeline_state, state_columns, state)
        emails = [
            (f"d{i}", CART, f"r{i}", f"r{i}@example.com", f"e{i}", NOW, NOW, status, None, 0)
            for i, status in enumerate(["pending", "pending", "sending", "sent"])
        ]
        bulk_write(conn, deliveries, list(DELIVERY_COLUMNS), emails)
        runs = [
            (
                "manual__2026-01-01T00:28:00+00:00",
                NOW - 120,
                NOW - 100,
                json.dumps({"drained": 105, "sent": 4}),
                12.5,
            ),
            ("scheduled__2", NOW - 60, None, None, None),
        ]
        bulk_write(
            conn, pipeline_runs, ["run_id", "started_at", "finished_at", "counts", "lag_seconds"], runs
        )


def test_status_figures(engine: Engine) -> None:
    seed(engine)
    status = pipeline_status(engine, CONSUMER, now=NOW)

    assert status["consumer"] == CONSUMER
    assert status["pipeline_host"] == "https://pipeline.example:8443"  # the credentials are cut
    assert status["position"] == "p304"
    assert status["last_fetch_at"] == NOW - 5
    assert status["events"] == {
        "received": 130,
        "quarantined": 3,
        "ignored": 7,
        "duplicate": 10,
        "requests_retried": 2,
    }
    assert status["staged"] == {  # counted in the chart's hours: not the 1000 before
        "since": CHART_START,
        "total": 3 + 2 + 60 + 40 + 9 + 2,
        "processed": 60,
        "by_status": {"matched": 50, "unmatched": 10, "ignored": 7, "quarantined": 3},
    }
    assert status["waiting"] == 6  # however old; this consumer's only
    assert status["emails"] == {
        "pending": 2,
        "sending": 1,
        "sent": 104,
        "failed": 1,
        "bounced": 2,
        "retried": 0,
        "suppressed": 3,
        "suppressed_by_reason": {"dedupe": 1, "opted_out": 2} | {"opted_out": 2},
    }
    assert list(status["emails"]["suppressed_by_reason"]) == ["opted_out", "dedupe"]  # largest first
    assert status["avg_processing_seconds"] == pytest.approx((120 + 160) / 100)  # the last 24 hours
    assert status["lag_seconds"] == pytest.approx(80 * HOUR)
    assert status["counting_since"] == CHART_START - HOUR

    _assert_the_chart(status["events_per_hour"])
    _assert_by_campaign(status["by_campaign"])
    _assert_the_runs(status["recent_runs"])
    json.dumps(status)  # the JSON endpoint returns it as is


def _assert_the_chart(series: list[dict[str, Any]]) -> None:
    assert len(series) == 72 and series[0]["hour"] == CHART_START and series[-1]["hour"] == THIS_HOUR
    by_hour = {point["hour"]: point["events"] for point in series if point["events"]}
    assert by_hour == {
        CHART_START: 2,
        THIS_HOUR - 30 * HOUR: 9,
        THIS_HOUR - 2 * HOUR: 40,
        THIS_HOUR - HOUR: 60,
        THIS_HOUR: 5,
    }


def _assert_by_campaign(by_campaign: dict[str, Any]) -> None:
    last_hour, last_day = by_campaign["last_hour"], by_campaign["last_day"]
    assert last_hour["since"] == THIS_HOUR - HOUR and last_day["since"] == THIS_HOUR - 23 * HOUR
    assert last_hour["campaigns"] == {
        CART: {
            "decided": 9,
            "sent": 3,
            "suppressed": 2,
            "failed": 1,
            "bounced": 0,
            "retried": 0,
            "suppressed_by_reason": {"opted_out": 2},
        },
        BROWSE: {
            "decided": 0,
            "sent": 1,
            "suppressed": 0,
            "failed": 0,
            "bounced": 0,
            "retried": 0,
            "suppressed_by_reason": {},
        },
    }
    assert list(last_day["campaigns"]) == [BROWSE, CART]  # the busiest first
    assert last_day["campaigns"][BROWSE]["decided"] == 20 and last_day["campaigns"][BROWSE]["sent"] == 1
    assert last_day["campaigns"][BROWSE]["suppressed_by_reason"] == {"dedupe": 1}


def _assert_the_runs(runs: list[dict[str, Any]]) -> None:
    assert [run["run_id"] for run in runs] == ["scheduled__2", "manual__2026-01-01T00:28:00+00:00"]
    assert runs[1]["counts"] == {"drained": 105, "sent": 4}
    assert (
        runs[1]["lag_seconds"] == 12.5 and runs[1]["took_seconds"] == 20 and runs[0]["took_seconds"] is None
    )


def test_status_of_an_empty_database(engine: Engine) -> None:
    upgrade_schema(engine)
    status = pipeline_status(engine, CONSUMER, now=NOW, days=1)
    assert status["events"]["received"] == 0 and status["staged"]["total"] == status["waiting"] == 0
    assert status["lag_seconds"] is None and status["avg_processing_seconds"] is None
    assert status["position"] is None and status["recent_runs"] == [] and status["counting_since"] is None
    assert [p["events"] for p in status["events_per_hour"]] == [0] * 24
    assert status["by_campaign"]["last_day"]["campaigns"] == {}


def test_status_of_a_database_not_yet_created(engine: Engine) -> None:
    status = pipeline_status(engine, CONSUMER, now=NOW, days=1)
    assert (
        status["staged"]["total"] == 0 and status["emails"]["sent"] == 0 and status["counting_since"] is None
    )


def test_hour_number_is_a_floor_on_both_databases(engine: Engine) -> None:
    from sqlalchemy import literal, select

    seconds = [0.0, 0.4, 1799.6, 3599.5, 3599.99, 3600.0, 7199.5, 1_767_225_599.7]
    with engine.connect() as conn:
        hours = [conn.execute(select(hour_number(literal(s)))).scalar_one() for s in seconds]
    assert hours == [int(s // 3600) for s in seconds]


# --- the Airflow UI view ------------------------------------------------------------------------


def _load_plugin() -> Any:
    spec = importlib.util.spec_from_file_location("triggers_status", ROOT / "plugins" / "triggers_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TextById(HTMLParser):
    """The visible text of every element that has an id."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[tuple[str, str | None]] = []
        self.text: dict[str, str] = {}
        self.bars: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_data(" ")  # cells and blocks read apart, as on screen
        attributes = dict(attrs)
        if tag == "rect" and "data-events" in attributes:
            self.bars.append(int(attributes["data-events"]))
        if tag not in ("meta", "line", "br", "input"):
            self.open.append((tag, attributes.get("id")))
            if attributes.get("id"):
                self.text.setdefault(attributes["id"], "")

    def handle_endtag(self, tag: str) -> None:
        self.handle_data(" ")
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _tag, element_id in self.open:
            if element_id:
                self.text[element_id] += data

    def visible(self, element_id: str) -> str:
        return re.sub(r"\s+", " ", self.text[element_id]).strip()


@pytest.fixture
def plugin(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TRIGGERS_DB_URL", db_url)
    monkeypatch.delenv("TRIGGERS_CONFIG", raising=False)  # the default configuration: customer_dev
    module = _load_plugin()
    yield module
    module._engine(db_url).dispose()
    module._engine.cache_clear()


def _signed_in_client(plugin: Any) -> TestClient:
    """A client whose user may read the DAG (the permission itself: test_status_needs_read_permission)."""
    plugin.app.dependency_overrides[plugin.require_dag_read] = lambda: None
    return TestClient(plugin.app)


def test_plugin_declares_the_app_and_the_nav_entry(plugin: Any) -> None:
    (app,) = plugin.TriggersStatusPlugin.fastapi_apps
    assert app["app"] is plugin.app and app["url_prefix"] == "/triggers"
    (view,) = plugin.TriggersStatusPlugin.external_views
    assert view["name"] == "Triggers status" and view["destination"] == "nav"
    assert view["href"] == "/triggers/status" and view["url_route"] == "triggers-status"


def test_status_page_shows_the_figures(plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(engine)
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    response = _signed_in_client(plugin).get("/status")
    assert response.status_code == 200, response.text
    page = _TextById()
    page.feed(response.text)

    assert page.visible("consumer") == CONSUMER
    assert page.visible("pipeline-host") == "https://pipeline.example:8443"
    assert "s3cret" not in response.text and "client:" not in response.text
    assert page.visible("last-fetch") == "2026-01-01 00:29:55 UTC (5.0 s ago)"
    assert page.visible("position") == "p304"
    assert page.visible("events-received") == "130"
    assert page.visible("events-quarantined") == "3"
    assert page.visible("events-ignored") == "7"
    assert page.visible("events-duplicate") == "10"
    assert page.visible("requests-retried") == "2"
    assert page.visible("staged-total") == "116"
    assert page.visible("staged-processed") == "60"
    assert page.visible("staged-waiting") == "6"
    assert page.visible("staged-matched") == "50"
    assert page.visible("lag") == "3 d 8 h"
    assert page.visible("avg-processing") == "2.8 s"
    assert page.visible("emails-sent") == "104"
    assert page.visible("emails-failed") == "1"
    assert page.visible("emails-bounced") == "2"
    assert page.visible("emails-pending") == "3"
    assert page.visible("emails-suppressed") == "3"
    assert "opted_out 2" in page.visible("suppressed-reasons")
    assert len(page.bars) == 72 and sum(page.bars) == 116 and max(page.bars) == 60
    assert "counting-since" not in page.text  # counted since before the chart's first hour
    # per campaign: campaign, decided, sent, suppressed (by reason), failed, bounced
    assert page.visible("campaigns-last-hour") == (
        "Campaign Decided Sent Suppressed Failed Bounced "
        "cart_abandonment 9 3 2 opted_out 2 1 0 browse_abandonment 0 1 0 0 0"
    )
    assert "browse_abandonment 20 1 1 dedupe 1 0 0" in page.visible("campaigns-last-day")
    runs = page.visible("recent-runs")
    assert "manual__2026-01-01T00:28:00+00:00 2026-01-01 00:28:00 UTC 20 s 12 s drained 105" in runs
    run_link = "/dags/triggers_pipeline/runs/manual__2026-01-01T00%3A28%3A00%2B00%3A00"
    assert f'href="{run_link}"' in response.text
    assert "http://" not in response.text.replace("http://www.w3.org", "")  # no external asset


def test_links_carry_the_base_url_path(plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(engine)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example:8443/tools/airflow/")
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    text = _signed_in_client(plugin).get("/status").text
    assert 'href="/tools/airflow/dags/triggers_pipeline/runs/scheduled__2"' in text
    assert 'href="status.json?days=3"' in text  # relative: beside the page, wherever it is served
    plugin.app.dependency_overrides.clear()
    refused = TestClient(plugin.app).get("/status").text  # the sign-in page's way back to Airflow
    assert 'href="/tools/airflow/"' in refused
    assert _load_plugin().TriggersStatusPlugin.external_views[0]["href"] == "/tools/airflow/triggers/status"


def test_hours_before_counting_began_are_named(
    plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_schema(engine)
    with engine.begin() as conn:
        add_counts(conn, THIS_HOUR - 2 * HOUR, _counts(staged=4))
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    page = _TextById()
    page.feed(_signed_in_client(plugin).get("/status").text)
    note = page.visible("counting-since")
    assert "counted since 2025-12-31 22:00:00 UTC" in note and "status --rollup" in note


def test_status_json(plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(engine)
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    response = _signed_in_client(plugin).get("/status.json", params={"days": 1})
    assert response.status_code == 200
    body = response.json()
    assert body["events"]["received"] == 130 and body["emails"]["sent"] == 4  # sent in the last day
    assert len(body["events_per_hour"]) == 24


def test_status_needs_a_signed_in_user(plugin: Any) -> None:
    client = TestClient(plugin.app)
    assert client.get("/status.json").status_code == 401
    page = client.get("/status")
    assert page.status_code == 401 and "Sign in to Airflow" in page.text


@pytest.fixture
def simple_auth_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Airflow's simple auth manager, as the api-server creates it."""
    from airflow.api_fastapi import app as airflow_app

    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER",
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    )
    before = airflow_app._AuthManagerState.instance
    airflow_app._AuthManagerState.instance = None
    try:
        yield airflow_app.create_auth_manager()
    finally:
        airflow_app._AuthManagerState.instance = before


@pytest.mark.parametrize(("role", "status"), [("admin", 200), ("viewer", 200), ("", 403)])
def test_status_needs_read_permission_on_the_dag(
    plugin: Any, engine: Engine, simple_auth_manager: Any, role: str, status: int
) -> None:
    """The auth manager's answer for the DAG decides: a user whose role is empty is signed in
    (the token resolves) but may read no DAG. The token itself: test_browser.py, a real api-server."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    seed(engine)
    user = SimpleAuthManagerUser(username=role or "nobody", role=role)
    plugin.app.dependency_overrides[plugin.require_signed_in] = lambda: user
    client = TestClient(plugin.app)
    answer = client.get("/status.json")
    assert answer.status_code == status
    page = client.get("/status")
    assert page.status_code == status
    if status == 403:
        assert "triggers_pipeline" in answer.json()["detail"] and "customer_dev" not in page.text
        assert "may not read the runs of the DAG triggers_pipeline" in page.text


def test_status_page_says_what_to_fix(plugin: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRIGGERS_DB_URL", "postgresql+psycopg://someone:hunter2@127.0.0.1:9/nowhere")
    response = _signed_in_client(plugin).get("/status")
    assert "cannot read the staging database" in response.text and "TRIGGERS_DB_URL" in response.text
    assert "hunter2" not in response.text
    monkeypatch.setenv("TRIGGERS_CONFIG", str(tmp_path / "missing.yaml"))
    response = _signed_in_client(plugin).get("/status.json")
    assert response.status_code == 503 and "TRIGGERS_CONFIG" in response.json()["error"]


def test_viewers_within_seconds_share_one_reading(
    plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(engine)
    client = _signed_in_client(plugin)
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    assert client.get("/status.json").json()["emails"]["sent"] == 104
    with engine.begin() as conn:
        add_counts(conn, NOW, {(CART, "sent"): 1})
    assert client.get("/status.json").json()["emails"]["sent"] == 104  # the cached reading
    monkeypatch.setattr(plugin, "CACHE_SECONDS", 0)
    assert client.get("/status.json").json()["emails"]["sent"] == 105


# --- a real DAG run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dag_run_records_how_long_it_took_and_the_counts_agree_with_its_rows(
    pipeline_workdir: Path, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """`airflow dags test triggers_pipeline` against the simulator and a real SMTP server: the run
    took the time from the DAG run's start to its report (not 0), and what the writers counted per
    hour is what the rows say."""
    import time

    from include.audience.load import load_recipients
    from include.config import load_config
    from include.sandbox.demo import airflow_environment
    from include.sandbox.keys import create_key_pair
    from include.sandbox.simulator.options import SimulatorOptions
    from include.sandbox.simulator.population import write_audience_csv
    from include.sandbox.simulator.server import Simulator
    from include.sandbox.smtp_server import LocalSmtpServer
    from tests.integration.test_pipeline_dag import run_dag

    private_key, public_key = create_key_pair(tmp_path / "keys")
    options = SimulatorOptions(
        public_key_pem=public_key.read_bytes(),
        events=400,
        people=80,
        malformed_share=0.02,
        duplicate_share=0.02,
        start_time=time.time() - 3 * 3600,
        time_span=7200.0,
        seed=7,
    )
    upgrade_schema(engine, load_config().dimensions)
    with Simulator(options) as simulator, LocalSmtpServer() as smtp:
        write_audience_csv(tmp_path / "audience.csv", 80)
        load_recipients(engine, tmp_path / "audience.csv")
        environment = airflow_environment(
            pipeline_workdir, simulator.url, smtp.port, private_key, options, db_url
        )
        environment["TRIGGERS_TOKEN_CACHE"] = str(tmp_path / "token-cache")
        before = time.time()
        run_dag(environment)
    status = pipeline_status(engine, load_config().pipeline.consumer)
    (run,) = status["recent_runs"]
    assert before <= run["started_at"] and run["took_seconds"] > 1.0  # the DAG run's start, not the report's
    assert status["events"]["received"] == 400
    _assert_the_counts_agree_with_the_rows(engine, status)


def _assert_the_counts_agree_with_the_rows(engine: Engine, status: dict[str, Any]) -> None:
    """What the writers counted per hour (staged, decided, sent per campaign) is what the rows say."""
    from sqlalchemy import func, select

    from include.database.schema import events_table

    events = events_table()
    with engine.connect() as conn:
        staged = conn.execute(select(func.count()).select_from(events)).scalar_one()
        emails = conn.execute(
            select(deliveries.c.campaign_id, deliveries.c.status, func.count()).group_by(
                deliveries.c.campaign_id, deliveries.c.status
            )
        ).all()
    assert status["staged"]["total"] == staged
    campaigns = status["by_campaign"]["last_hour"]["campaigns"]
    for campaign, state, n in emails:
        if state == "sent":
            assert campaigns[campaign]["sent"] == n
    decided = Counter()
    for campaign, _state, n in emails:
        decided[campaign] += n
    assert {c: counts["decided"] for c, counts in campaigns.items() if counts["decided"]} == dict(decided)
    assert status["emails"]["sent"] == sum(n for _c, state, n in emails if state == "sent") > 0


@pytest.fixture(scope="module")
def pipeline_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated Airflow metadata database for the DAG run (as test_pipeline_dag's)."""
    import subprocess

    from include.sandbox.demo import AIRFLOW, airflow_environment
    from include.sandbox.simulator.options import SimulatorOptions

    workdir = tmp_path_factory.mktemp("dag-run")
    environment = airflow_environment(
        workdir, "http://127.0.0.1:1", 1, workdir / "none.pem", SimulatorOptions(), "sqlite://"
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=environment, check=True, capture_output=True, timeout=300)
    return workdir
