"""SQLite is durable at each commit: WAL with synchronous=FULL, so a commit that records a send
survives power loss (NORMAL in WAL mode may lose the last commits), on every connection."""

from __future__ import annotations

from sqlalchemy import text

from include.database.engine import make_engine

FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_every_sqlite_connection_is_wal_with_synchronous_full(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'triggers.db'}")
    try:
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
                assert conn.execute(text("PRAGMA synchronous")).scalar_one() == FULL
    finally:
        engine.dispose()
