"""Drain, match and deliver log progress lines at the configured pace on long work
(TRIGGERS_PROGRESS_INTERVAL, small here): what is done, the rate, what remains when known.

Only what a loaded machine cannot upset is asserted: enough lines, never two closer than the
interval, done never decreasing, what remains consistent with what is done (the timing goals
are bench/'s)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from include.config import TriggersConfig
from include.database.engine import make_engine
from include.matching.run import match_ready_events
from include.sandbox.smtp_server import LocalSmtpServer
from include.staging.drain import drain
from tests.conftest import upgrade_schema
from tests.integration.test_delivery import deliver, seed
from tests.unit.test_drain import ScriptedJournal, config

NUMBER = r"([\d,]+)"


class SlowJournal(ScriptedJournal):
    """A journal that takes its time to answer each page (a far or busy Adobe endpoint)."""

    def fetch(self, since, limit, *, latest=False):
        time.sleep(0.03)
        return super().fetch(since, limit, latest=latest)


def _lines(caplog: pytest.LogCaptureFixture, stage: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"{stage} progress: ")]


def _done(record: logging.LogRecord) -> int:
    return int(re.search(rf"progress: {NUMBER} ", record.getMessage()).group(1).replace(",", ""))


def _remaining(record: logging.LogRecord) -> int:
    return int(re.search(rf", {NUMBER} remaining", record.getMessage()).group(1).replace(",", ""))


def _paced(records: list[logging.LogRecord], interval: float) -> bool:
    """No two lines closer than the interval (a slow machine may space them more, never less)."""
    gaps = [b.created - a.created for a, b in zip(records, records[1:], strict=False)]
    return all(gap >= interval * 0.7 for gap in gaps)


@pytest.fixture
def staging(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'staging.db'}")
    upgrade_schema(engine, config().dimensions)
    yield engine
    engine.dispose()


def test_a_long_drain_and_its_match_log_progress(
    staging: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIGGERS_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO)
    report = drain(staging, config(), SlowJournal(400), max_events=360)  # 90 pages of 4, ~3 s
    lines = _lines(caplog, "drain")
    assert report.received == 360 and len(lines) >= 5, [r.getMessage() for r in lines]
    assert _paced(lines, 0.2)
    done = [_done(r) for r in lines]
    assert done == sorted(done) and 0 < done[0] < done[-1] <= 360
    assert all(
        re.search(rf"events in \d+ s, {NUMBER}/s now .*, {NUMBER} remaining", r.getMessage()) for r in lines
    )  # the cap says how many remain

    monkeypatch.setenv("TRIGGERS_PROGRESS_INTERVAL", "0.01")  # matching 360 events is quick
    counts = match_ready_events(staging, config(), now=time.time())
    lines = _lines(caplog, "match")
    assert counts["ready"] == 360 and lines, caplog.text[-2000:]
    # the 360 waiting when the run started, less those decided so far
    assert all(_remaining(r) == 360 - _done(r) for r in lines), [r.getMessage() for r in lines]


def test_a_long_delivery_logs_progress(
    engine: Engine,
    config: TriggersConfig,  # noqa: F811 - the integration conftest's fixture
    server: LocalSmtpServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIGGERS_PROGRESS_INTERVAL", "0.25")
    caplog.set_level(logging.INFO)
    seed(engine, config, [{} for _ in range(60)])
    server.faults.delay = 0.04  # a slow relay: 50 messages take about 2 s on one connection
    counts = deliver(engine, config, server, connections=1, window=1, max_messages=50)
    lines = _lines(caplog, "deliver")
    assert counts["sent"] == 50 and len(lines) >= 4, [r.getMessage() for r in lines]
    assert _paced(lines, 0.25)
    done = [_done(r) for r in lines]
    assert done == sorted(done) and done[-1] <= 50
    # 60 due when the run started, the cap 50: the cap is the nearer
    assert all(_remaining(r) == 50 - _done(r) for r in lines), [r.getMessage() for r in lines]
    assert all(
        re.search(r"messages in .* remaining .* retried, \d+ in flight$", r.getMessage()) for r in lines
    )


def test_without_a_cap_delivery_says_what_was_due_when_it_started(
    engine: Engine,
    config: TriggersConfig,  # noqa: F811 - the integration conftest's fixture
    server: LocalSmtpServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIGGERS_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO)
    seed(engine, config, [{} for _ in range(30)])
    server.faults.delay = 0.04  # about 1.2 s on one connection
    assert deliver(engine, config, server, connections=1, window=1)["sent"] == 30
    lines = _lines(caplog, "deliver")
    assert len(lines) >= 2, [r.getMessage() for r in lines]
    assert all(_remaining(r) == 30 - _done(r) for r in lines), [r.getMessage() for r in lines]
