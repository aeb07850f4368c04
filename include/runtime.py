"""Process-level helpers: worker processes started with ``spawn``, the garbage collector paused,
progress lines of long work."""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from include.errors import ConfigError


def spawn_pool(
    workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...]
) -> ProcessPoolExecutor:
    """A pool whose processes are started now, by ``spawn``.

    The caller's ``__main__`` is hidden while they start: a worker needs nothing of it, and a
    script without an ``if __name__ == "__main__"`` guard would otherwise run again in each.
    """
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs
    )
    caller_main = sys.modules["__main__"]
    sys.modules["__main__"] = ModuleType("__main__")
    try:
        for _ in range(workers):  # submitting starts the processes (Python 3.11: one per submit)
            pool.submit(int)
    finally:
        sys.modules["__main__"] = caller_main
    return pool


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: code that builds millions of short-lived containers
    (row tuples) would trigger full collections that scan them all and free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


PROGRESS_INTERVAL_ENV = "TRIGGERS_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0  # seconds between two progress lines of a long drain, match or delivery


def number_setting(
    name: str,
    default: float,
    low: float,
    high: float = math.inf,
    *,
    whole: bool = False,
    hint: str = "",
    error: type[Exception] = ConfigError,
    environ: Mapping[str, str] = os.environ,
) -> float:
    """The finite number in environment variable ``name`` (unset or empty: ``default``), from
    ``low`` to ``high``; else ``error`` naming the setting, its value and what to write."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw) if not whole or raw.isdigit() else math.nan
    except ValueError:
        value = math.nan
    if math.isfinite(value) and low <= value <= high:
        return value
    kind = "a whole number" if whole else "a number"
    span = f"between {low:,.10g} and {high:,.10g}" if math.isfinite(high) else f"of {low:,.10g} or more"
    raise error(f"{name} is {raw!r}: set it to {kind} {span}{hint}, or unset it")


def progress_interval() -> float:
    """``TRIGGERS_PROGRESS_INTERVAL`` in seconds (default 30); 0 turns progress lines off."""
    return number_setting(
        PROGRESS_INTERVAL_ENV,
        DEFAULT_PROGRESS_INTERVAL,
        0,
        hint=" (the seconds between progress lines, e.g. 30; 0 turns them off)",
        error=ValueError,
    )


@contextmanager
def progress_logged(
    logger: logging.Logger,
    stage: str,
    unit: str,
    done: Callable[[], int],
    remaining: Callable[[], int | None] | None = None,
    detail: Callable[[], str] | None = None,
    interval: float | None = None,
    total: int | None = None,
) -> Iterator[None]:
    """While the body runs, log every ``interval`` seconds (``TRIGGERS_PROGRESS_INTERVAL``) a line
    saying how far ``stage`` is: ``done()`` units so far, the rate, and ``remaining()`` when known.
    ``total``: the units waiting when the stage started (read once); what remains is then at most
    ``total - done()``.

    A thread of its own writes the lines, so a stage that is stuck (a slow relay, a lock) still
    shows in its log; work shorter than one interval logs nothing. ``done`` and ``remaining`` are
    read from that thread: they must only read counters.
    """
    interval = progress_interval() if interval is None else interval
    if interval <= 0:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def left() -> int | None:
        known = remaining() if remaining else None
        if total is None:
            return known
        return total - done() if known is None else min(known, total - done())

    def report() -> None:
        last_done, last_at = 0, started
        while not stop.wait(interval):
            now, count = time.monotonic(), done()
            logger.info(
                progress_line(
                    stage,
                    unit,
                    count,
                    now - started,
                    (count - last_done) / max(now - last_at, 1e-9),
                    left(),
                    detail() if detail else "",
                )
            )
            last_done, last_at = count, now

    thread = threading.Thread(target=report, name=f"{stage}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def progress_line(
    stage: str, unit: str, done: int, elapsed: float, rate: float, remaining: int | None, detail: str = ""
) -> str:
    """``deliver progress: 12,400 messages in 62 s, 210/s now (200/s overall), 3,100 remaining
    (about 15 s)``; the remaining part only when known, ``detail`` appended."""
    overall = done / elapsed if elapsed > 0 else 0.0
    line = (
        f"{stage} progress: {done:,} {unit} in {elapsed:.0f} s, {rate:,.0f}/s now ({overall:,.0f}/s overall)"
    )
    if remaining is not None:
        line += f", {max(remaining, 0):,} remaining"
        if rate > 0:
            line += f" (about {max(remaining, 0) / rate:,.0f} s)"
    return f"{line}, {detail}" if detail else line
