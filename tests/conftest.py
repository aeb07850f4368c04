"""Shared fixtures: a fresh database on SQLite and on PostgreSQL for every database test, and
``upgrade_schema``, which brings a database to the code's schema as ``db upgrade`` does.

PostgreSQL is the server at ``TRIGGERS_TEST_PG_URL`` (default: the local one, user postgres);
where none answers, its tests are skipped with the reason printed (``-ra``).
"""

from __future__ import annotations

import os
import socketserver
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, create_engine, text
from sqlalchemy.engine import Engine, make_url

from include.database.engine import make_engine
from include.database.schema import events_table
from include.operations.database import upgrade_database

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("TRIGGERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
_pg_unreachable: str | None = None


def _postgres_reason() -> str | None:
    """None when the test server answers, else why not (checked once per session)."""
    global _pg_unreachable
    if _pg_unreachable is None:
        try:
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text("SELECT 1"))
            admin.dispose()
            _pg_unreachable = ""
        except Exception as error:  # any driver error means: skip, with the reason
            _pg_unreachable = f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).render_as_string()}: {error}".splitlines()[
                0
            ]
    return _pg_unreachable or None


def new_database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A new empty database of ``kind`` ('sqlite' or 'postgresql'), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'triggers.db'}"
        return
    reason = _postgres_reason()
    if reason:
        pytest.skip(reason)
    name = f"triggers_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database; every test using it runs on SQLite and on PostgreSQL."""
    yield from new_database_url(request.param, tmp_path)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def upgrade_schema(engine: Engine, dimensions: Sequence[str] = ()) -> Table:
    """The database brought to the code's schema as ``db upgrade`` does (migrations, then the
    ``dim_*`` columns of ``dimensions``); the events table to write to."""
    upgrade_database(engine, dimensions)
    return events_table(tuple(dimensions))


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[Any]:
    """``server`` answering from a thread inside; shut down and closed on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
