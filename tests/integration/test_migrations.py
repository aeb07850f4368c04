"""Schema migrations on SQLite and PostgreSQL: a fresh database gets the tables the code queries;
a database made before migrations is upgraded in place, its rows kept; ``check_current`` fails on
a database behind or ahead of the code, naming it and the command that fixes it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, inspect, text
from sqlalchemy.engine import make_url

from include import cli
from include.config import load_config
from include.database import migrate
from include.database.engine import make_engine
from include.database.migrate import (
    UPGRADE_COMMAND,
    VERSION_TABLE,
    SchemaVersion,
    check_current,
    head,
    schema_version,
    upgrade,
)
from include.database.schema import events_table, metadata
from include.database.sql import bulk_write
from include.errors import SchemaOutOfDateError
from include.operations.database import upgrade_database
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
DIMENSIONS = load_config().dimensions  # the dim_* columns of the fixtures
TABLES = ("pipeline_state", "recipients", "deliveries", "pipeline_runs", "pipeline_events")
FRONTIER_TRIGGERS = {"pipeline_events_frontier", "pipeline_events_frontier_requeued"}
T1, T2 = "trigger-one", "trigger-two"


def run_script(engine: Engine, path: Path) -> None:
    connection = engine.raw_connection()
    try:
        if engine.dialect.name == "sqlite":
            connection.driver_connection.executescript(path.read_text())
        else:
            connection.cursor().execute(path.read_text())
        connection.commit()
    finally:
        connection.close()


def event(event_id: str, trigger_id: str | None, time_gmt: float, status: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "position": f"p-{event_id}",
        "consumer": "c",
        "trigger_id": trigger_id,
        "time_gmt": time_gmt,
        "received_at": time_gmt + 1,
        "status": status,
        "payload": "{}",
        "dim_evar01": "A",
        "dim_pagename": None,
    }


OLDER_VERSION = (  # before the frontier: no frontier table, and indexes that are gone since
    "DROP TABLE matching_frontier",
    "CREATE INDEX ix_deliveries_status ON deliveries (status)",
    "CREATE INDEX ix_pipeline_events_status_time ON pipeline_events (status, time_gmt)",
)
IN_USE = (
    "INSERT INTO pipeline_state VALUES ('c', 'p-e5', 'host', 10.0, 5, 1, 0, 0, 2)",
    "INSERT INTO recipients VALUES ('r1', 'ann@example.com', 'Ann', NULL, 'fr', 'S1', 'MC1', false, 3.0)",
    "INSERT INTO pipeline_runs VALUES ('run-1', 1.0, 2.0, '{\"drained\": 5}', 0.5)",
    "INSERT INTO deliveries (delivery_id, campaign_id, recipient_id, email, event_id, event_time, decided_at, "
    "status, attempts) VALUES ('d1', 'cart', 'r1', 'ann@example.com', 'e1', 100.0, 101.0, 'pending', 0)",
)


def made_before_migrations(engine: Engine, *, with_frontier: bool) -> None:
    """A database as the code before migrations made it (the frozen dump), in use; without the
    frontier it is one of the versions before that."""
    run_script(engine, FIXTURES / f"pre_migrations_{engine.dialect.name}.sql")
    with engine.begin() as conn:
        if not with_frontier:
            on = " ON pipeline_events" if engine.dialect.name == "postgresql" else ""
            for name in sorted(FRONTIER_TRIGGERS):
                conn.execute(text(f"DROP TRIGGER {name}{on}"))
            for statement in OLDER_VERSION:
                conn.execute(text(statement))
        for statement in IN_USE:
            conn.execute(text(statement))
        columns = list(event("x", None, 0, "new"))
        conn.execute(
            text(
                f"INSERT INTO pipeline_events ({', '.join(columns)}) "
                f"VALUES ({', '.join(':' + c for c in columns)})"
            ),
            [
                event("e1", T1, 100.0, "matched"),
                event("e2", T1, 300.0, "new"),
                event("e3", T1, 200.0, "new"),
                event("e4", T2, 400.0, "new"),
                event("e5", None, 500.0, "quarantined"),
            ],
        )


def rows(engine: Engine, like: dict[str, list[tuple]] | None = None) -> dict[str, list[tuple]]:
    """Every row of the old tables; with ``like``, only the columns those rows had (later
    revisions add columns, empty in the rows they adopt)."""
    with engine.connect() as conn:
        found = {
            table: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]
            for table in TABLES
        }
    if like is None:
        return found
    widths = {table: len(kept[0]) if kept else 0 for table, kept in like.items()}
    return {table: [r[: widths[table]] if widths[table] else r for r in found[table]] for table in found}


def frontier(engine: Engine) -> dict[str, tuple[float, int]]:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT trigger_id, low_time, version FROM matching_frontier"))
        return {trigger_id: (low_time, version) for trigger_id, low_time, version in found}


def schema_differences(engine: Engine, dimensions: tuple[str, ...] = ()) -> list[Any]:
    """What Alembic's autogenerate sees between the database and the tables the code queries."""
    expected = MetaData()
    for table in [*metadata.tables.values(), events_table(dimensions)]:
        table.to_metadata(expected)
    with engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), expected
        )


def triggers(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return set(conn.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars())
        return set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())


def index_names(engine: Engine) -> set[str]:
    inspector = inspect(engine)
    return {
        index["name"] for table in ("deliveries", "pipeline_events") for index in inspector.get_indexes(table)
    }


def test_a_fresh_database_gets_the_tables_the_code_queries(engine: Engine) -> None:
    assert upgrade(engine) == SchemaVersion(None, head())
    assert schema_differences(engine) == []
    assert triggers(engine) == FRONTIER_TRIGGERS
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            options = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'pipeline_events'")
            ).scalar()
        assert options == ["fillfactor=50"]
    assert upgrade(engine) == SchemaVersion(head(), head())  # again: nothing to do


@pytest.mark.parametrize(
    "with_frontier", [True, False], ids=["made-by-the-last-version", "made-before-the-frontier"]
)
def test_a_database_made_before_migrations_is_upgraded_in_place(engine: Engine, with_frontier: bool) -> None:
    made_before_migrations(engine, with_frontier=with_frontier)
    kept, frontier_before = rows(engine), frontier(engine) if with_frontier else None
    with pytest.raises(SchemaOutOfDateError, match="made before schema migrations"):
        check_current(engine, DIMENSIONS)

    done = upgrade_database(engine, DIMENSIONS)

    assert (done.before, done.revision, done.added_dimensions) == (None, head(), ())
    assert schema_version(engine) == SchemaVersion(head(), head())
    check_current(engine, DIMENSIONS)
    assert rows(engine, like=kept) == kept
    assert schema_differences(engine, DIMENSIONS) == []
    assert triggers(engine) == FRONTIER_TRIGGERS
    assert not index_names(engine) & {"ix_deliveries_status", "ix_pipeline_events_status_time"}
    # the frontier: as the triggers kept it, or seeded from the new events
    assert frontier(engine) == (frontier_before if with_frontier else {T1: (200.0, 1), T2: (400.0, 1)})
    # and staging goes on: a new event lowers its trigger's frontier and raises its version
    table = events_table(DIMENSIONS)
    with engine.begin() as conn:
        staged = event("e6", T2, 50.0, "new")
        bulk_write(conn, table, list(staged), [tuple(staged.values())])
    assert frontier(engine)[T2] == (50.0, 2)


def test_check_current_names_the_database_and_the_command_that_fixes_it(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql" and url.password is None:
        url = url.set(password="never-shown")  # the local test server trusts its clients
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(SchemaOutOfDateError) as empty:
            check_current(engine)
        message = str(empty.value)
        assert UPGRADE_COMMAND in message and "(empty)" in message
        assert engine.url.render_as_string(hide_password=True) in message
        assert url.password is None or url.password not in message

        upgrade(engine)
        check_current(engine)
        with pytest.raises(SchemaOutOfDateError, match="dim_evar01, dim_pagename.*db upgrade"):
            check_current(engine, DIMENSIONS)
        upgrade_database(engine, DIMENSIONS)
        check_current(engine, DIMENSIONS)

        with engine.begin() as conn:
            conn.execute(text("UPDATE triggers_schema_version SET version_num = '9999'"))
        with pytest.raises(SchemaOutOfDateError, match="at schema revision 9999, newer than this code knows"):
            check_current(engine, DIMENSIONS)
    finally:
        engine.dispose()


NEXT_REVISION = '''"""A revision after the newest: what a later release adds."""

from alembic import op

revision = "next"
down_revision = "{head}"


def upgrade() -> None:
    op.get_bind().exec_driver_sql("CREATE TABLE added_later (id TEXT PRIMARY KEY)")
'''


def test_a_database_behind_fails_the_check_until_upgraded(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = upgrade(engine).head
    later = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, later, ignore=shutil.ignore_patterns("__pycache__"))
    (later / "versions" / "next_revision.py").write_text(NEXT_REVISION.format(head=head()))
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", later)
    migrate._scripts.cache_clear()
    try:
        with pytest.raises(
            SchemaOutOfDateError,
            match=f"at schema revision {current}, this code needs next: run `{UPGRADE_COMMAND}`",
        ):
            check_current(engine)
        assert upgrade(engine) == SchemaVersion(current, "next")
        check_current(engine)
        assert "added_later" in inspect(engine).get_table_names()
    finally:
        migrate._scripts.cache_clear()


def test_the_db_commands(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIGGERS_DB_URL", db_url)
    assert cli.main(["db", "check"]) == 1
    assert f"run `{UPGRADE_COMMAND}`" in capsys.readouterr().err
    assert cli.main(["db", "upgrade"]) == 0
    assert (
        f"schema none -> {head()}; dimension columns added: {', '.join(DIMENSIONS)}"
        in capsys.readouterr().out
    )
    assert cli.main(["db", "check"]) == 0
    assert f"schema {head()}, this code's {head()}" in capsys.readouterr().out
