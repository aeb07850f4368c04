"""The status figures (include/operations/status.py) and the Airflow UI view that shows them
(plugins/triggers_status.py), on SQLite and PostgreSQL, from rows written with db.bulk_write."""

from __future__ import annotations

import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from include.database.schema import deliveries, pipeline_runs, pipeline_state
from include.database.sql import bulk_write
from include.operations.status import hour_number, pipeline_status
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = "customer_dev"  # the default configuration's consumer
NOW = 1_767_225_600.0 + 1800  # 2026-01-01 00:30:00 UTC
HOUR = 3600.0
CHART_START = 1_767_225_600.0 - 71 * HOUR  # 72 hourly buckets, the current hour last
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


def _event(
    n: int,
    status: str,
    received_at: float,
    processed_at: float | None = None,
    consumer: str = CONSUMER,
    reason: str | None = None,
) -> tuple[Any, ...]:
    return (
        f"{consumer}-{n}",
        f"p{n}",
        consumer,
        "3e8a2ba7",
        received_at - 30,
        received_at,
        status,
        reason,
        processed_at,
        "{}",
    )


def seed(engine: Engine) -> None:
    """A small, known pipeline history; the expected figures are in the tests below."""
    table = upgrade_schema(engine)
    rows = []
    rows += [_event(i, "matched", NOW - HOUR - i, NOW - HOUR - i + 2) for i in range(60)]  # 23:xx
    rows += [_event(100 + i, "unmatched", NOW - 2 * HOUR - i, NOW - 2 * HOUR - i + 4) for i in range(40)]
    rows.append(_event(200, "matched", NOW - 48 * HOUR, NOW - 47 * HOUR))  # processed a day ago: not averaged
    rows += [_event(300 + i, "new", NOW - 90 + i) for i in range(5)]
    rows.append(_event(399, "new", NOW - 80 * HOUR))  # stuck for days: before the chart, but waiting
    rows += [_event(400 + i, "ignored", NOW - 50 * HOUR) for i in range(7)]
    # the first bucket, at its very start and its very end: floor, not rounding, picks the hour
    rows += [
        _event(500, "quarantined", CHART_START, reason="no triggerId"),
        _event(501, "quarantined", CHART_START + HOUR - 0.1, reason="not JSON"),
        _event(502, "quarantined", CHART_START - 0.1, reason="too large"),
    ]  # before the chart
    rows += [_event(600 + i, "new", NOW - 99 * HOUR, consumer="another") for i in range(4)]
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
    delivery_columns = [
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
    ]
    outcomes = ["sent"] * 4 + ["failed"] + ["pending"] * 2 + ["suppressed"] * 3
    reasons = [None] * 7 + ["opted_out", "opted_out", "dedupe"]
    emails = [
        (
            f"d{i}",
            "cart_abandonment",
            f"r{i}",
            f"r{i}@example.com",
            f"{CONSUMER}-{i}",
            NOW - HOUR,
            NOW - HOUR,
            status,
            reason,
            1,
        )
        for i, (status, reason) in enumerate(zip(outcomes, reasons, strict=True))
    ]
    runs = [
        ("manual__1", NOW - 120, NOW - 100, json.dumps({"drained": 105, "sent": 4}), 12.5),
        ("scheduled__2", NOW - 60, None, None, None),
    ]
    with engine.begin() as conn:
        bulk_write(conn, table, EVENT_COLUMNS, rows)
        bulk_write(conn, pipeline_state, state_columns, state)
        bulk_write(conn, deliveries, delivery_columns, emails)
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
    assert status["staged"] == {  # those received in the chart's window: not event 502
        "since": CHART_START,
        "total": 115,
        "processed": 101,
        "by_status": {"new": 5, "matched": 61, "unmatched": 40, "ignored": 7, "quarantined": 2},
    }
    assert status["waiting"] == 6  # however old; this consumer's only
    assert status["emails"] == {
        "pending": 2,
        "sending": 0,
        "sent": 4,
        "failed": 1,
        "suppressed": 3,
        "bounced": 0,
        "suppressed_by_reason": {"opted_out": 2, "dedupe": 1},
    }
    assert status["avg_processing_seconds"] == pytest.approx((60 * 2 + 40 * 4) / 100)
    assert status["lag_seconds"] == pytest.approx(80 * HOUR)

    series = status["events_per_hour"]
    assert len(series) == 72 and series[0]["hour"] == CHART_START and series[-1]["hour"] == NOW - 1800
    by_hour = {point["hour"]: point["events"] for point in series if point["events"]}
    assert by_hour == {
        CHART_START: 2,
        NOW - 1800 - 50 * HOUR: 7,
        NOW - 1800 - 48 * HOUR: 1,
        NOW - 1800 - 2 * HOUR: 40,
        NOW - 1800 - HOUR: 60,
        NOW - 1800: 5,
    }

    assert [run["run_id"] for run in status["recent_runs"]] == ["scheduled__2", "manual__1"]
    assert status["recent_runs"][1]["counts"] == {"drained": 105, "sent": 4}
    assert status["recent_runs"][1]["lag_seconds"] == 12.5
    json.dumps(status)  # the JSON endpoint returns it as is


def test_status_of_an_empty_database(engine: Engine) -> None:
    status = pipeline_status(engine, CONSUMER, now=NOW, days=1)
    assert status["events"]["received"] == 0 and status["staged"]["total"] == status["waiting"] == 0
    assert status["lag_seconds"] is None and status["avg_processing_seconds"] is None
    assert status["position"] is None and status["recent_runs"] == []
    assert [p["events"] for p in status["events_per_hour"]] == [0] * 24


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
    plugin.app.dependency_overrides[plugin.require_signed_in] = lambda: None
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
    assert page.visible("staged-processed") == "101"
    assert page.visible("staged-waiting") == "6"
    assert page.visible("staged-matched") == "61"
    assert page.visible("lag") == "3 d 8 h"
    assert page.visible("avg-processing") == "2.8 s"
    assert page.visible("emails-sent") == "4"
    assert page.visible("emails-failed") == "1"
    assert page.visible("emails-pending") == "2"
    assert page.visible("emails-suppressed") == "3"
    assert "opted_out 2" in page.visible("suppressed-reasons")
    assert len(page.bars) == 72 and sum(page.bars) == 115 and max(page.bars) == 60
    assert "manual__1" in page.visible("recent-runs") and "drained 105" in page.visible("recent-runs")
    assert "http://" not in response.text.replace("http://www.w3.org", "")  # no external asset


def test_status_json(plugin: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(engine)
    monkeypatch.setattr(plugin, "_now", lambda: NOW)
    response = _signed_in_client(plugin).get("/status.json", params={"days": 1})
    assert response.status_code == 200
    body = response.json()
    assert body["events"]["received"] == 130 and body["emails"]["sent"] == 4
    assert len(body["events_per_hour"]) == 24


def test_status_needs_a_signed_in_user(plugin: Any) -> None:
    client = TestClient(plugin.app)
    assert client.get("/status.json").status_code == 401
    page = client.get("/status")
    assert page.status_code == 401 and "Sign in to Airflow" in page.text


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
    assert client.get("/status.json").json()["emails"]["sent"] == 4
    with engine.begin() as conn:
        bulk_write(
            conn,
            deliveries,
            ["delivery_id", "campaign_id", "event_id", "event_time", "decided_at", "status", "attempts"],
            [("d-new", "c", "e", NOW, NOW, "sent", 1)],
        )
    assert client.get("/status.json").json()["emails"]["sent"] == 4  # the cached reading
    monkeypatch.setattr(plugin, "CACHE_SECONDS", 0)
    assert client.get("/status.json").json()["emails"]["sent"] == 5
