"""db.bulk_write on SQLite and PostgreSQL: new keys written, taken keys skipped, in one transaction."""

from __future__ import annotations

from sqlalchemy import Engine, text

from include.database.schema import recipients
from include.database.sql import bulk_write, in_list, list_param
from tests.conftest import upgrade_schema

COLUMNS = ["recipient_id", "email", "opted_out"]


def emails(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT recipient_id, email FROM recipients")).all())


def test_rows_whose_key_is_taken_are_skipped_and_the_others_written(engine: Engine) -> None:
    upgrade_schema(engine)
    with engine.begin() as conn:
        assert bulk_write(conn, recipients, COLUMNS, [("r1", "old@example.com", False)]) == 1
    with engine.begin() as conn:
        # PostgreSQL: the plain COPY hits r1 and is taken back; the rows go through ON CONFLICT
        written = bulk_write(
            conn,
            recipients,
            COLUMNS,
            [
                ("r2", "two@example.com", False),
                ("r1", "new@example.com", False),
                ("r3", "three@example.com", False),
                ("r3", "again@example.com", False),
            ],
        )
        conn.execute(text("UPDATE recipients SET opted_out = true WHERE recipient_id = 'r2'"))  # still usable
    assert written == 2
    assert emails(engine) == {"r1": "old@example.com", "r2": "two@example.com", "r3": "three@example.com"}
    with engine.begin() as conn:  # all new: written as they are
        assert (
            bulk_write(conn, recipients, COLUMNS, [(f"n{i}", f"{i}@example.com", False) for i in range(1000)])
            == 1000
        )
    assert len(emails(engine)) == 1003


def test_upsert_overwrites_the_other_columns(engine: Engine) -> None:
    upgrade_schema(engine)
    with engine.begin() as conn:
        bulk_write(conn, recipients, COLUMNS, [("r1", "old@example.com", False)])
        bulk_write(
            conn,
            recipients,
            COLUMNS,
            [("r1", "new@example.com", False), ("r2", "two@example.com", False)],
            conflict="update",
        )
    assert emails(engine) == {"r1": "new@example.com", "r2": "two@example.com"}


def test_a_list_parameter_keeps_every_value_as_it_is(engine: Engine) -> None:
    values = ["plain", "a,b", "{brace}", 'say "hi"', "back\\slash", "NULL", "", " spaced ", "é\x1fx"]
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMPORARY TABLE probe (v TEXT)"))
        conn.execute(text("INSERT INTO probe VALUES (:v)"), [{"v": v} for v in [*values, "other"]])
        found = conn.execute(
            text(f"SELECT v FROM probe WHERE {in_list(conn, 'v', 'list')}"),
            {"list": list_param(conn, values)},
        )
        assert sorted(row[0] for row in found) == sorted(values)
        none = conn.execute(
            text(f"SELECT count(*) FROM probe WHERE {in_list(conn, 'v', 'list')}"),
            {"list": list_param(conn, [])},
        )
        assert none.scalar_one() == 0
