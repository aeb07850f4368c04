"""Process-level helpers: worker processes started with ``spawn``, the garbage collector paused."""

from __future__ import annotations

import gc
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import Any


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
