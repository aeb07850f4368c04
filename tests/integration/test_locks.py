"""Run locks on SQLite and PostgreSQL: one holder at a time, across processes, and a killed holder
leaves no lock behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import Engine

from include.database.locks import run_lock
from include.errors import RunLockTimeoutError
from tests.conftest import ROOT

HOLDER = """
import sys, time
from include.database.engine import make_engine
from include.database.locks import run_lock
with run_lock(make_engine(sys.argv[1]), "matching"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_waits_until_the_first_lets_go(engine: Engine) -> None:
    order: list[str] = []
    with run_lock(engine, "matching"):
        with pytest.raises(RunLockTimeoutError, match="another matching run"):
            with run_lock(engine, "matching", timeout=0.3):
                pass
        with run_lock(engine, "drain", timeout=0.3):  # another name is another lock
            order.append("drain")
        waiter = threading.Thread(target=lambda: _take(engine, order))
        waiter.start()
        time.sleep(0.5)
        order.append("first done")
    waiter.join(10)
    assert order == ["drain", "first done", "second"]


def _take(engine: Engine, order: list[str]) -> None:
    with run_lock(engine, "matching", timeout=10):
        order.append("second")


def test_a_killed_holder_leaves_no_lock(engine: Engine, db_url: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db_url], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(RunLockTimeoutError):
            with run_lock(engine, "matching", timeout=0.3):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(engine, "matching", timeout=10):
        pass
