"""Run locks: at most one drain and one matching run at a time on a database.

A run holds its lock for its whole work, so that a backfill beside the schedule, a manual CLI
run or two schedulers take turns instead of deciding the same events twice. The lock dies with
its holder, so a SIGKILLed run never leaves a stale one: on PostgreSQL it is a session advisory
lock on a connection kept for the run; on SQLite (one machine) an exclusive ``flock`` on a file
beside the database.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text

from include.errors import RunLockTimeoutError

POLL_SECONDS = 0.2


@contextmanager
def run_lock(engine: Engine, name: str, *, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock ``name`` ("drain", "matching") inside; wait for it at most ``timeout``
    seconds (None: until it is free), then raise RunLockTimeoutError."""
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, name, timeout):
            yield
    else:
        with _file_lock(engine, name, timeout):
            yield


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``, the same in every process."""
    digest = hashlib.sha256(f"airflow-adobe-triggers:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _advisory_lock(engine: Engine, name: str, timeout: float | None) -> Iterator[None]:
    key = _lock_key(name)
    with engine.connect() as conn:
        if timeout is None:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        else:
            _wait(
                lambda: conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one(),
                name,
                timeout,
                engine,
            )
        conn.commit()  # the lock belongs to the session, not to this transaction
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


@contextmanager
def _file_lock(engine: Engine, name: str, timeout: float | None) -> Iterator[None]:
    database = engine.url.database
    if not database or database == ":memory:":  # private to one connection: nothing to share
        yield
        return
    path = Path(f"{database}.{name}.lock")
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if timeout is None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        else:
            _wait(lambda: _try_flock(descriptor), name, timeout, engine)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _try_flock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait(take, name: str, timeout: float, engine: Engine) -> None:
    deadline = time.monotonic() + timeout
    while not take():
        if time.monotonic() >= deadline:
            shown = engine.url.render_as_string(hide_password=True)
            raise RunLockTimeoutError(
                f"another {name} run still holds its lock on {shown} after {timeout:g} s; it ends by itself "
                "(or dies, which releases the lock): run again later"
            )
        time.sleep(POLL_SECONDS)
