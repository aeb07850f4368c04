"""Schema migrations of the staging database: Alembic, run in code (no alembic.ini).

``upgrade(engine)`` brings the database to the newest revision of ``migrations/versions/``; a
database made before migrations (tables, no ``VERSION_TABLE``) is adopted in place by revision
0001, which is idempotent. ``check_current(engine, dimensions)`` is what a task or a command does
instead of DDL: a few catalog reads that fail with the command that upgrades the database.
A new revision is a file in ``versions/`` whose DDL is written out (never derived from schema.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError

from include.config import dimension_column
from include.errors import SchemaOutOfDateError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
UPGRADE_COMMAND = "python -m include.cli db upgrade"
# not Alembic's default alembic_version: the staging tables may share a database with Airflow's own
VERSION_TABLE = "triggers_schema_version"


class SchemaVersion(NamedTuple):
    current: str | None  # None: no VERSION_TABLE (an empty database, or one made before migrations)
    head: str


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for the migrations of this package, run on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


def head() -> str:
    """The newest revision this code knows."""
    return _scripts().get_current_head()  # type: ignore[return-value]


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def schema_version(engine: Engine) -> SchemaVersion:
    with engine.connect() as conn:
        return SchemaVersion(current_revision(conn), head())


def upgrade(engine: Engine) -> SchemaVersion:
    """Apply the revisions the database lacks and return the revision it was at and the one it is
    at now. One transaction on PostgreSQL; on SQLite DDL commits as it goes, so a revision is
    written to be rerun."""
    with engine.begin() as conn:
        before = current_revision(conn)
        command.upgrade(alembic_config(conn), "head")
    return SchemaVersion(before, head())


def check_current(engine: Engine, dimensions: Sequence[str] = ()) -> None:
    """Raise SchemaOutOfDateError unless the database is at this code's revision and has the
    ``dim_*`` column of each configured dimension; the message names the command that fixes it."""
    with engine.connect() as conn:
        current = current_revision(conn)
        if current != head():
            raise SchemaOutOfDateError(_revision_problem(conn, current))
        if dimensions:
            _check_dimension_columns(conn, dimensions)


def _check_dimension_columns(conn: Connection, dimensions: Sequence[str]) -> None:
    # unquoted: SQLite reads a quoted name that is no column as a string; dim_[a-z0-9_]+ needs no quotes
    columns = ", ".join(dimension_column(name) for name in dimensions)
    try:
        conn.exec_driver_sql(f"SELECT {columns} FROM pipeline_events WHERE 1 = 0")
        return
    except DBAPIError as error:
        failure = error
        conn.rollback()  # PostgreSQL refuses any statement after an error in the transaction
    existing = {c["name"] for c in inspect(conn).get_columns("pipeline_events")}
    missing = [dimension_column(name) for name in dimensions if dimension_column(name) not in existing]
    if not missing:  # it failed for another reason
        raise failure
    raise SchemaOutOfDateError(
        f"the staging database {_shown(conn.engine)} has no column for the configured dimension(s) "
        f"({', '.join(missing)}): run `{UPGRADE_COMMAND}` with this configuration; it adds and fills them"
    )


def _revision_problem(conn: Connection, current: str | None) -> str:
    database, newest = f"the staging database {_shown(conn.engine)}", head()
    if current is None:
        made = "made before schema migrations" if inspect(conn).has_table("pipeline_events") else "empty"
        return f"{database} has no schema version ({made}); this code needs {newest}: run `{UPGRADE_COMMAND}`"
    if current in {script.revision for script in _scripts().walk_revisions()}:
        return (
            f"{database} is at schema revision {current}, this code needs {newest}: run `{UPGRADE_COMMAND}`"
        )
    return (
        f"{database} is at schema revision {current}, newer than this code knows (its newest is {newest}): "
        "it was upgraded by a newer version of the project; run that version against it, not this one"
    )


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
