"""The drain loop against a scripted journal client on SQLite: pages staged with their position,
204 ends it, the per-run cap, ``start_from: latest``, 410, the retries it reports."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, select

import include.staging.drain as drain_module
from include.adobe.journal import JournalDrained, JournalPage
from include.config import parse_config
from include.database.engine import make_engine
from include.database.schema import events_table, pipeline_state
from include.errors import ConfigError, JournalGoneError
from include.staging.drain import drain
from tests.conftest import upgrade_schema

CART = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
CONFIG_YAML = f"""
pipeline:
  consumer: customer_dev
  topics: [{{name: triggers, triggers: [{{name: {CART}, label: cart_abandonment}}]}}]
  fetch_size: 4
campaigns:
  - id: cart
    trigger: cart_abandonment
    identity: {{dimension: eVar01, column: shopper_id}}
    template: cart_abandonment
    sender: shop@example.com
"""


def config(**pipeline: object):
    loaded = parse_config(CONFIG_YAML)
    return loaded.model_copy(update={"pipeline": loaded.pipeline.model_copy(update=pipeline)})


class ScriptedJournal:
    """A journal client over an in-memory journal of positions ``p1``, ``p2``...: what
    JournalClient.fetch answers, without HTTP. Thread-safe (the drain prefetches)."""

    def __init__(self, events: int, *, consumer: str = "customer_dev", oldest: int = 1) -> None:
        self.consumer = consumer
        self.credentials = SimpleNamespace(pipeline_url="https://pipeline.test")
        self.retries = 0
        self.events = events
        self.oldest = oldest  # older positions have left the retention: 410
        self.calls: list[tuple[str | None, int, bool]] = []
        self.retry_on_call: int | None = None  # the call that had a transient failure first
        self._lock = threading.Lock()

    def fetch(self, since: str | None, limit: int, *, latest: bool = False) -> JournalPage | JournalDrained:
        with self._lock:
            self.calls.append((since, limit, latest))
            if len(self.calls) == self.retry_on_call:
                self.retries += 1
            if since is None and latest:
                return JournalDrained(5.0, f"p{self.events}")
            after = int(since[1:]) if since else self.oldest - 1
            if after < self.oldest - 1:
                raise JournalGoneError(f"position {since!r} is older than the journal's retention (410)")
            numbers = range(after + 1, min(after + limit, self.events) + 1)
            if not numbers:
                return JournalDrained(5.0)
            return JournalPage(page(numbers), f"p{numbers[-1]}")


def page(numbers: range) -> bytes:
    events = [
        {"position": f"p{n}", "event": {"event_id": f"e{n}", "triggerId": CART, "timeGMT": 1.7e9 + n}}
        for n in numbers
    ]
    return json.dumps(
        {"events": events, "_page": {"last": f"p{numbers[-1]}" if numbers else None, "count": len(events)}}
    ).encode()


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'staging.db'}")
    upgrade_schema(engine, config().dimensions)
    yield engine
    engine.dispose()


def staged(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(select(events_table().c.event_id)))


def state(engine: Engine):
    with engine.connect() as conn:
        return conn.execute(select(pipeline_state)).one()


def test_pages_are_staged_with_their_position_until_204(engine):
    journal = ScriptedJournal(10)
    report = drain(engine, config(), journal)
    assert (report.pages, report.received, report.staged, report.drained) == (3, 10, 10, True)
    assert report.position == "p10" and staged(engine) == sorted(f"e{n}" for n in range(1, 11))
    assert journal.calls == [(None, 4, False), ("p4", 4, False), ("p8", 4, False), ("p10", 4, False)]
    stored = state(engine)
    assert (stored.position, stored.events_received, stored.pipeline_host) == ("p10", 10, "pipeline.test")


def test_the_next_drain_goes_on_from_the_stored_position(engine):
    journal = ScriptedJournal(6)
    drain(engine, config(), journal)
    journal.events = 9  # published since
    journal.calls.clear()
    report = drain(engine, config(), journal)
    assert journal.calls[0] == ("p6", 4, False)
    assert (report.received, report.staged, report.position) == (3, 3, "p9") and len(staged(engine)) == 9


def test_a_page_staged_again_is_stored_once(engine):
    journal = ScriptedJournal(6)
    drain(engine, config(), journal)
    with engine.begin() as conn:  # as after a crash between the commit and the next request
        conn.execute(pipeline_state.update().values(position="p2"))
    report = drain(engine, config(), journal)
    assert (report.received, report.staged, report.duplicates) == (4, 0, 4) and len(staged(engine)) == 6


@pytest.mark.parametrize("cap_from", ["configuration", "argument"])
def test_the_per_run_cap_limits_what_is_asked_for(engine, cap_from):
    journal = ScriptedJournal(20)
    if cap_from == "configuration":
        report = drain(engine, config(max_events_per_run=10), journal)
    else:
        report = drain(engine, config(), journal, max_events=10)
    assert [limit for _, limit, _ in journal.calls] == [4, 4, 2]  # the prefetched request too
    assert (report.received, report.drained, report.position) == (10, False, "p10")
    assert state(engine).position == "p10" and len(staged(engine)) == 10


def test_an_empty_page_ends_the_drain(engine):
    class EmptyPages(ScriptedJournal):
        def fetch(self, since, limit, *, latest=False):
            self.calls.append((since, limit, latest))
            assert len(self.calls) <= 2, "the drain went on after an empty page"
            return JournalPage(json.dumps({"events": [], "_page": {"count": 0}}).encode(), "p1")

    journal = EmptyPages(0)
    report = drain(engine, config(), journal)
    assert (report.pages, report.received, report.drained) == (1, 0, False)
    assert journal.calls[0] == (None, 4, False)


def test_start_from_latest_stores_the_end_of_the_journal_then_goes_on_from_it(engine):
    journal = ScriptedJournal(10)
    first = drain(engine, config(start_from="latest"), journal)
    assert journal.calls == [(None, 4, True)]
    assert (first.received, first.drained, state(engine).position) == (0, True, "p10") and staged(
        engine
    ) == []
    journal.events = 12
    second = drain(engine, config(start_from="latest"), journal)
    assert journal.calls[1] == ("p10", 4, False) and second.staged == 2


def test_410_fails_naming_the_setting_or_restarts_from_the_oldest(engine, caplog):
    journal = ScriptedJournal(8)
    drain(engine, config(), journal)
    journal.oldest, journal.events = 12, 14  # p8 has left the retention
    with pytest.raises(JournalGoneError, match="set pipeline.on_gone: restart_from_oldest"):
        drain(engine, config(), journal)
    assert state(engine).position == "p8"
    report = drain(engine, config(on_gone="restart_from_oldest"), journal)
    assert journal.calls[-3:] == [("p8", 4, False), (None, 4, False), ("p14", 4, False)]
    assert (report.received, report.position) == (3, "p14") and "is lost" in caplog.text


def test_the_retries_of_the_client_are_reported_and_stored(engine):
    journal = ScriptedJournal(10)
    journal.retries = 5  # retries of an earlier drain: not this one's
    journal.retry_on_call = 2
    report = drain(engine, config(), journal)
    assert report.retries == 1 and state(engine).requests_retried == 1


def test_pages_are_written_in_batches_of_at_least_stage_batch_events(engine, monkeypatch):
    monkeypatch.setattr(drain_module, "STAGE_BATCH_EVENTS", 8)
    written: list[int] = []
    stage = drain_module.Stager.stage

    def counting_stage(self, page, **kwargs):
        written.append(page.count)
        return stage(self, page, **kwargs)

    monkeypatch.setattr(drain_module.Stager, "stage", counting_stage)
    report = drain(engine, config(), ScriptedJournal(22))
    assert sum(written) == report.staged == 22
    assert all(count >= 8 for count in written[:-1]) and len(written) < report.pages


def test_a_client_of_another_consumer_is_refused_before_anything_is_fetched(engine):
    journal = ScriptedJournal(4, consumer="someone_else")
    with pytest.raises(ConfigError, match="pipeline.consumer is 'customer_dev'"):
        drain(engine, config(), journal)
    assert journal.calls == []
