"""The audience from a database: a query through an Airflow connection's SQL hook, in chunks.

``load_recipients_from_sql`` upserts what the query returns with the CSV path's validation and
reasons (``AudienceLoad``; "row N" where a file says "line N"). ``sync_recipients`` does the same,
then removes the recipients the source no longer has: only ``recipients`` rows; suppressions
and ``deliveries`` are never touched, and a pending email of a removed recipient is suppressed
at send time as ``unknown_recipient``. A sync that would remove more than ``max_removed_share``
of the recipients, or whose source returns no row, changes nothing and fails unless forced:
an empty or truncated result is more often a broken query than a lost audience.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, text

from include.audience.load import AudienceLoad, check_columns
from include.database.sql import in_list, list_param
from include.errors import AudienceError, RemovalRefusedError
from include.runtime import number_setting

DEFAULT_CHUNK_SIZE = 50_000
DEFAULT_MAX_REMOVED_SHARE = 0.1
REMOVE_BATCH = 10_000
DEFAULT_TIMEOUT = 3600


@dataclass(frozen=True)
class AudienceSource:
    """Where ``audience_sync`` reads the audience: the ``TRIGGERS_AUDIENCE_*`` settings."""

    conn_id: str | None
    sql: str | None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_removed_share: float = DEFAULT_MAX_REMOVED_SHARE

    @classmethod
    def from_env(cls) -> AudienceSource:
        """TRIGGERS_AUDIENCE_CONN_ID, TRIGGERS_AUDIENCE_SQL (or _SQL_FILE), _CHUNK_SIZE and
        _MAX_REMOVED_SHARE; a bad number raises AudienceError naming the setting."""
        sql = os.environ.get("TRIGGERS_AUDIENCE_SQL") or None
        sql_file = os.environ.get("TRIGGERS_AUDIENCE_SQL_FILE") or None
        if sql and sql_file:
            raise AudienceError("set TRIGGERS_AUDIENCE_SQL or TRIGGERS_AUDIENCE_SQL_FILE, not both")
        return cls(
            conn_id=os.environ.get("TRIGGERS_AUDIENCE_CONN_ID") or None,
            sql=read_sql_file(Path(sql_file)) if sql_file else sql,
            chunk_size=int(_number("TRIGGERS_AUDIENCE_CHUNK_SIZE", DEFAULT_CHUNK_SIZE, 1, 10_000_000)),
            max_removed_share=max_removed_share_setting(),
        )


def timeout_setting() -> float:
    """TRIGGERS_AUDIENCE_TIMEOUT: the sync task's execution_timeout in seconds (default 3600)."""
    return _number("TRIGGERS_AUDIENCE_TIMEOUT", DEFAULT_TIMEOUT, 1, 7 * 86_400)


def max_removed_share_setting() -> float:
    """TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE, 0 to 1 (default 0.1)."""
    return _number("TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE", DEFAULT_MAX_REMOVED_SHARE, 0, 1)


def _number(name: str, default: float, low: float, high: float) -> float:
    return number_setting(name, default, low, high, error=AudienceError)


def read_sql_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise AudienceError(f"cannot read the audience query file {path}: {error}") from None


def as_text(value: Any) -> str:
    """A source value as the CSV path sees it: NULL -> "", booleans -> true/false, integral
    numbers without ".0", bytes as UTF-8 (undecodable bytes become U+FFFD)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sql_hook(conn_id: str) -> Any:
    """The SQL hook of Airflow connection ``conn_id`` (``Connection.get_hook()``)."""
    from airflow.providers.common.sql.hooks.sql import DbApiHook
    from airflow.sdk import BaseHook

    try:
        connection = BaseHook.get_connection(conn_id)
    except Exception as error:  # AirflowNotFoundException and the secrets backends' own errors
        raise AudienceError(
            f"no Airflow connection {conn_id!r} ({error}); define it, e.g. AIRFLOW_CONN_{conn_id.upper()}"
        ) from None
    try:
        hook = connection.get_hook()
    except Exception as error:  # no provider for the type, or a hook that cannot start
        raise AudienceError(
            f"connection {conn_id!r} (type {connection.conn_type}) has no usable hook: {error}; "
            "use a SQL database connection (postgres, mysql, ...) and install its provider"
        ) from None
    if not isinstance(hook, DbApiHook):
        raise AudienceError(
            f"connection {conn_id!r} (type {connection.conn_type}) is not a SQL database: its hook is "
            f"{type(hook).__name__}; use a postgres, mysql, sqlite... connection"
        )
    return hook


def _without_password(message: str, hook: Any) -> str:
    """A driver's message with the connection's password masked (some echo the DSN back)."""
    try:
        password = hook.get_connection(hook.get_conn_id()).password
    except Exception:  # noqa: BLE001 - no password to mask is the safe default: nothing echoed it
        password = None
    return message.replace(password, "***") if password else message


def _streaming_cursor(db: Any) -> Any:
    """A server-side cursor where the driver has one (psycopg2/psycopg, mysqlclient): only one
    chunk is then held in memory, not the whole result; else the driver's plain cursor."""
    driver = type(db).__module__.split(".")[0]
    if driver in ("psycopg2", "psycopg"):
        return db.cursor(name="triggers_audience")
    if driver == "MySQLdb":
        from MySQLdb.cursors import SSCursor

        return db.cursor(SSCursor)
    return db.cursor()


def query_chunks(conn_id: str, sql: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """The query's rows, ``chunk_size`` at a time, every value as text; the first chunk may be
    empty (a query that returns no row still tells its columns)."""
    if not sql or not sql.strip():
        raise AudienceError("the audience query is empty; give --sql, --sql-file or TRIGGERS_AUDIENCE_SQL")
    hook = sql_hook(conn_id)
    try:
        db = hook.get_conn()
    except Exception as error:  # refused login, unknown host, database down: each driver's own class
        raise AudienceError(
            f"cannot connect to the audience database of connection {conn_id!r}: "
            f"{_without_password(str(error), hook)}; check its host, port, login and password"
        ) from None
    with closing(db), closing(_streaming_cursor(db)) as cursor:
        first = True
        while True:
            try:
                if first:
                    cursor.execute(sql)
                rows = cursor.fetchmany(chunk_size)
            except Exception as error:  # each driver has its own error classes
                raise AudienceError(f"the audience query on {conn_id!r} failed: {error}") from None
            if first and not cursor.description:  # a named cursor tells its columns after a fetch
                raise AudienceError(f"the audience query on {conn_id!r} returns no rows (is it a SELECT?)")
            if rows or first:
                names = [column[0] for column in cursor.description]
                yield pd.DataFrame([[as_text(v) for v in row] for row in rows], columns=names, dtype=object)
            first = False
            if len(rows) < chunk_size:
                return


def _load(conn: Any, conn_id: str, sql: str, chunk_size: int) -> AudienceLoad:
    load = None
    row = 1
    for chunk in query_chunks(conn_id, sql, chunk_size):
        if load is None:
            load = AudienceLoad(
                conn, check_columns(chunk.columns, f"the query on {conn_id!r}", "columns"), "row"
            )
        if not chunk.empty:
            load.chunk(chunk, row)
            row += len(chunk)
    assert load is not None  # query_chunks yields at least one chunk or raises
    return load


def load_recipients_from_sql(
    engine: Engine, conn_id: str, sql: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, Any]:
    """Upsert ``recipients`` from a query on Airflow connection ``conn_id`` whose columns are
    the CSV header's names (alias them: ``SELECT id AS recipient_id, ...``). Same report as the
    CSV load, rows numbered from 1. One transaction: a query that fails loads nothing."""
    with engine.begin() as conn:
        return _load(conn, conn_id, sql, chunk_size).report()


def sync_recipients(
    engine: Engine,
    conn_id: str,
    sql: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_removed_share: float = DEFAULT_MAX_REMOVED_SHARE,
    force: bool = False,
) -> dict[str, Any]:
    """Upsert what the query returns and remove the recipients it no longer returns.

    A recipient whose row was rejected is kept (the source still has them). The load report
    plus "removed" and "before" (recipients before the sync). Raises AudienceError, changing
    nothing, when the source returns no row or the removals exceed ``max_removed_share`` of
    "before", unless ``force``.
    """
    with engine.begin() as conn:
        before = conn.execute(text("SELECT count(*) FROM recipients")).scalar_one()
        load = _load(conn, conn_id, sql, chunk_size)
        current = conn.execute(text("SELECT recipient_id FROM recipients")).scalars().all()
        gone = sorted(set(current) - load.given_ids)
        _check_removals(len(gone), before, len(load.given_ids), max_removed_share, force)
        for start in range(0, len(gone), REMOVE_BATCH):
            batch = gone[start : start + REMOVE_BATCH]
            conn.execute(
                text(f"DELETE FROM recipients WHERE {in_list(conn, 'recipient_id', 'ids')}"),
                {"ids": list_param(conn, batch)},
            )
    return {**load.report(), "removed": len(gone), "before": before}


def _check_removals(removed: int, before: int, given: int, max_share: float, force: bool) -> None:
    if force or removed == 0:
        return
    if given == 0:
        raise RemovalRefusedError(
            f"the audience source returned no recipient: the sync would remove all {removed}; nothing "
            "was changed. Check the query; if the audience really is empty, run the sync forced "
            "(DAG param force_removals, or `audience sync --force`)"
        )
    if removed > max_share * before:
        raise RemovalRefusedError(
            f"the sync would remove {removed} of {before} recipients ({removed / before:.0%}), more than "
            f"TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE ({max_share:g}); nothing was changed. Check the query; "
            "if they really are gone, run the sync forced (DAG param force_removals, or `audience sync --force`)"
        )
