"""The status view's Prometheus endpoint, /triggers/metrics: the last recorded run's metrics,
read back by the reference parser, on SQLite and PostgreSQL; signed-in like the page."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from include.operations.report import record_run
from tests.conftest import ROOT, upgrade_schema


@pytest.fixture
def plugin(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TRIGGERS_DB_URL", db_url)
    monkeypatch.delenv("TRIGGERS_CONFIG", raising=False)
    spec = importlib.util.spec_from_file_location("triggers_status", ROOT / "plugins" / "triggers_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module._engine(db_url).dispose()
    module._engine.cache_clear()


def _scrape(plugin: Any) -> dict[tuple[str, tuple], float]:
    plugin.app.dependency_overrides[plugin.require_dag_read] = lambda: None
    response = TestClient(plugin.app).get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_the_last_run_on_the_prometheus_endpoint(plugin: Any, engine: Engine) -> None:
    upgrade_schema(engine)
    assert not _scrape(plugin)  # before any run: the families, no sample
    drained = {"received": 40, "staged": 38, "quarantined": 1, "ignored": 1, "retries": 2}
    record_run(engine, "manual__1", drained, {"matched": 30, "suppressed_opted_out": 3}, {"sent": 1})
    record_run(
        engine,
        "manual__2",
        {"received": 12, "staged": 12},
        {"matched": 10, "suppressed_frequency_cap": 2},
        {"sent": 8, "failed": 1, "retried": 2, "deliver_seconds": 4.0},
    )
    samples = _scrape(plugin)
    assert samples[("triggers_run_events", (("kind", "received"),))] == 12  # the last run's
    assert samples[("triggers_run_events", (("kind", "matched"),))] == 10
    assert samples[("triggers_run_emails", (("outcome", "sent"),))] == 8
    assert samples[("triggers_run_emails", (("outcome", "retried"),))] == 2
    assert samples[("triggers_run_suppressed", (("reason", "frequency_cap"),))] == 2
    assert ("triggers_run_suppressed", (("reason", "opted_out"),)) not in samples
    assert samples[("triggers_send_rate", ())] == 2.0
    assert samples[("triggers_lag_seconds", ())] == 0.0


def test_the_endpoint_needs_a_signed_in_user(plugin: Any) -> None:
    assert TestClient(plugin.app).get("/metrics").status_code == 401


@pytest.mark.parametrize("stored", ["{cut short", "[1, 2]", ""])
def test_a_run_whose_counts_cannot_be_read_still_answers(plugin: Any, engine: Engine, stored: str) -> None:
    """A counts cell that is not a JSON object (edited by hand, cut short) leaves the counts out,
    like the status page: the endpoint answers 200 with the run's time, not a 500."""
    from sqlalchemy import update

    from include.database.schema import pipeline_runs

    upgrade_schema(engine)
    record_run(engine, "manual__1", {"received": 3}, {"matched": 3}, {"sent": 3})
    with engine.begin() as conn:
        conn.execute(update(pipeline_runs).values(counts=stored))
    samples = _scrape(plugin)
    assert ("triggers_run_finished_timestamp_seconds", ()) in samples
    assert not any(name == "triggers_run_events" for name, _ in samples)
