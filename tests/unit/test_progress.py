"""Progress lines of long work (include/runtime.py): at the configured pace, with the rate and
what remains, from a thread of their own (a stuck stage still shows). Only what a loaded machine
cannot upset is asserted (no upper bound on a gap, no rate range): the timing goals are bench/'s."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from include.runtime import PROGRESS_INTERVAL_ENV, progress_interval, progress_line, progress_logged

log = logging.getLogger("tests.progress")
LINE = re.compile(r"^work progress: ([\d,]+) items in (\d+) s, ([\d,]+)/s now \(([\d,]+)/s overall\)")


def _run(
    seconds: float, interval: float, remaining_total: int | None = None, total: int | None = None
) -> float:
    """Work at about 1,000 items a second for ``seconds``, logged; how long it took."""
    done = [0]
    stop = threading.Event()

    def work() -> None:  # 1,000 items a second
        while not stop.is_set():
            done[0] += 10
            time.sleep(0.01)

    remaining = (lambda: remaining_total - done[0]) if remaining_total is not None else None
    started = time.monotonic()
    with progress_logged(log, "work", "items", lambda: done[0], remaining, interval=interval, total=total):
        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(seconds)
        stop.set()
        worker.join()
    return time.monotonic() - started


def test_long_work_logs_a_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.progress")
    took = _run(1.3, 0.1)
    records = [r for r in caplog.records if r.name == "tests.progress"]
    # a line per interval, not per item: at least a few, at most one per interval elapsed
    assert 3 <= len(records) <= took / 0.1 + 1, [r.getMessage() for r in records]
    gaps = [b.created - a.created for a, b in zip(records, records[1:], strict=False)]
    assert all(gap >= 0.1 * 0.7 for gap in gaps), gaps  # never closer than the interval
    parsed = [LINE.match(r.getMessage()) for r in records]
    assert all(parsed), [r.getMessage() for r in records]
    counts = [int(m.group(1).replace(",", "")) for m in parsed]
    assert counts == sorted(counts) and counts[-1] > 0
    assert int(parsed[-1].group(4).replace(",", "")) > 0  # work went on: the overall rate shows it


def test_short_work_logs_nothing_and_remaining_is_shown_when_known(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.progress")
    _run(0.1, 0.5)
    assert not [r for r in caplog.records if r.name == "tests.progress"]
    _run(0.7, 0.3, remaining_total=5000)
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.progress"]
    assert lines and all(re.search(r", [\d,]+ remaining \(about [\d,]+ s\)$", line) for line in lines), lines


def test_what_remains_of_a_total_read_at_the_start(caplog: pytest.LogCaptureFixture) -> None:
    """``total``: the units waiting when the stage started; each line says total - done (never
    below 0), or the nearer of that and the stage's own ``remaining`` (a cap)."""
    caplog.set_level(logging.INFO, logger="tests.progress")
    _run(0.5, 0.1, total=200)  # done passes 200 on the way: 0 remaining then, never negative
    _run(0.5, 0.1, remaining_total=100, total=100_000)  # the cap is the nearer
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.progress"]
    assert len(lines) >= 2, lines
    for line in lines:
        done = int(LINE.match(line).group(1).replace(",", ""))
        left = int(re.search(r", ([\d,]+) remaining", line).group(1).replace(",", ""))
        assert left in (max(200 - done, 0), max(100 - done, 0)), line


def test_a_stalled_stage_still_logs() -> None:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with progress_logged(log, "work", "items", lambda: 7, interval=0.1):
            time.sleep(0.35)
    finally:
        log.removeHandler(handler)
    assert len(lines) >= 2 and all(" 0/s now" in line for line in lines[1:]), lines


def test_the_line_reads_well() -> None:
    line = progress_line("deliver", "messages", 12_400, 62.0, 210.0, 3_100, "5 retried, 40 in flight")
    assert line == (
        "deliver progress: 12,400 messages in 62 s, 210/s now (200/s overall), 3,100 remaining "
        "(about 15 s), 5 retried, 40 in flight"
    )
    assert (
        progress_line("match", "events", 0, 30.0, 0.0, None)
        == "match progress: 0 events in 30 s, 0/s now (0/s overall)"
    )


def test_the_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV, raising=False)
    assert progress_interval() == 30.0
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "2.5")
    assert progress_interval() == 2.5
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(PROGRESS_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=PROGRESS_INTERVAL_ENV):
            progress_interval()
