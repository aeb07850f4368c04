"""The ``dim_<name>`` columns of ``pipeline_events``, one per configured dimension.

They follow the configuration, not a schema revision: ``db upgrade`` adds the missing ones and
fills them from the stored payloads of the events still staged, as staging would have.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Engine, Table, bindparam, inspect, select, update

from include.config import dimension_column
from include.database.schema import events_table
from include.staging.parser import dimension_columns_of

FILL_BATCH_ROWS = 10_000


def add_dimension_columns(engine: Engine, dimensions: Sequence[str]) -> list[str]:
    """Add and fill the missing ``dim_*`` columns in one transaction; return their dimensions."""
    table = events_table(tuple(dimensions))
    with engine.begin() as conn:
        existing = {c["name"] for c in inspect(conn).get_columns("pipeline_events")}
        added = [name for name in dimensions if dimension_column(name) not in existing]
        for name in added:
            conn.exec_driver_sql(f'ALTER TABLE pipeline_events ADD COLUMN "{dimension_column(name)}" TEXT')
        if added:
            _fill_dimension_columns(conn, table, added)
    return added


def _fill_dimension_columns(conn: Connection, table: Table, names: Sequence[str]) -> None:
    statement = (
        update(table)
        .where(table.c.event_id == bindparam("_event_id"))
        .values({dimension_column(name): bindparam(f"_{dimension_column(name)}") for name in names})
    )
    rows = conn.execute(select(table.c.event_id, table.c.payload).where(table.c.status != "quarantined"))
    while batch := rows.fetchmany(FILL_BATCH_ROWS):
        updates = []
        for event_id, payload in batch:
            values = dimension_columns_of(payload, names)
            if any(v is not None for v in values):
                updates.append(
                    {
                        "_event_id": event_id,
                        **{f"_{dimension_column(n)}": v for n, v in zip(names, values, strict=True)},
                    }
                )
        if updates:
            conn.execute(statement, updates)
