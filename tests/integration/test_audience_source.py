"""The audience from a database (issue 15): a query on a real second database, PostgreSQL and
MariaDB, through the Airflow connection's SQL hook, into the staging database (SQLite and
PostgreSQL); the same reasons as the CSV path, chunks, the sync's removals and its guard."""

from __future__ import annotations

import csv
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from include import cli
from include.audience.load import CSV_COLUMNS, load_recipients
from include.audience.source import load_recipients_from_sql, sync_recipients
from include.config import load_config
from include.database.engine import make_engine
from include.delivery.eligibility import still_eligible
from include.errors import AudienceError, RemovalRefusedError
from tests.conftest import new_database_url, upgrade_schema

# like TRIGGERS_TEST_PG_URL (tests/conftest.py): the server, else the local one
MARIADB_ADMIN_URL = os.environ.get(
    "TRIGGERS_TEST_MARIADB_URL", "mysql+mysqldb://root@127.0.0.1:3306/mysql?charset=utf8mb4"
)
CONN_ID = "audience_source"
QUERY = f"SELECT {', '.join(CSV_COLUMNS)} FROM people ORDER BY seq"


class Source:
    """A database of one kind with a ``people`` table, and the Airflow connection to it."""

    def __init__(self, kind: str, engine: Engine) -> None:
        self.kind, self.engine = kind, engine

    def write(self, rows: list[dict[str, Any]], column_type: str = "TEXT") -> None:
        """Replace ``people`` with these rows (missing keys: NULL), in this order."""
        columns = ", ".join(f"{c} {column_type}" for c in CSV_COLUMNS)
        with self.engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS people"))
            conn.execute(text(f"CREATE TABLE people (seq INTEGER PRIMARY KEY, {columns})"))
            if rows:
                conn.execute(
                    text(
                        f"INSERT INTO people (seq, {', '.join(CSV_COLUMNS)}) "
                        f"VALUES (:seq, {', '.join(':' + c for c in CSV_COLUMNS)})"
                    ),
                    [{"seq": n, **dict.fromkeys(CSV_COLUMNS), **row} for n, row in enumerate(rows)],
                )


def _mariadb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Source]:
    name = f"audience_src_{uuid.uuid4().hex[:10]}"
    where = make_url(MARIADB_ADMIN_URL)
    try:  # only a server that does not answer (or a driver not installed) skips, as conftest's
        admin = create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as error:  # any driver error: skip, with the reason
        pytest.skip(
            f"MariaDB not reachable at {where.host}:{where.port or 3306} ({where.render_as_string()}; "
            f"set TRIGGERS_TEST_MARIADB_URL): {str(error).splitlines()[0]}"
        )
    with admin.connect() as conn:  # a server that answers but refuses this fails the test
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
    extra = {"charset": "utf8mb4"}
    connection = {
        "conn_type": "mysql",
        "host": where.host,
        "port": where.port or 3306,
        "login": where.username,
        "password": where.password,
        "schema": name,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({**connection, "extra": extra}))
    engine = create_engine(make_url(MARIADB_ADMIN_URL).set(database=name))
    try:
        yield Source("mariadb", engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def _postgres(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Source]:
    for url in new_database_url("postgresql", tmp_path / "source"):  # skips when PostgreSQL is away
        parsed = make_url(url)
        connection = {
            "conn_type": "postgres",
            "host": parsed.host,
            "port": parsed.port or 5432,
            "login": parsed.username,
            "password": parsed.password,
            "schema": parsed.database,
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(connection))
        engine = create_engine(url)
        try:
            yield Source("postgresql", engine)
        finally:
            engine.dispose()


@pytest.fixture(params=["postgresql", "mariadb"])
def source(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Source]:
    if request.param == "mariadb":
        yield from _mariadb(monkeypatch)
    else:
        yield from _postgres(monkeypatch, tmp_path)


@pytest.fixture
def engine(engine: Engine) -> Engine:
    """conftest's staging engine (SQLite and PostgreSQL), at the code's schema (`db upgrade`)."""
    upgrade_schema(engine, load_config().dimensions)
    return engine


def recipients(engine: Engine) -> dict[str, dict[str, Any]]:
    """The recipients by id, without the load time."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM recipients")).mappings().all()
    return {
        row["recipient_id"]: {**row, "opted_out": bool(row["opted_out"]), "updated_at": None} for row in rows
    }


def person(n: int, **changes: Any) -> dict[str, Any]:
    return {"recipient_id": f"r{n}", "email": f"p{n}@example.com", "shopper_id": f"S{n}", **changes}


# the CSV test's rows, in a database: the same rejections, with the same reasons
MIXED = [
    {**person(1), "first_name": "Ann", "locale": "fr_FR", "mc_id": "MC1", "opted_out": "false"},
    {**person(2), "recipient_id": " r2 ", "email": " bob@example.com ", "opted_out": "YES"},
    {"recipient_id": None, "email": "nobody@example.com"},  # no id
    {"recipient_id": "r1", "email": "again@example.com"},  # duplicate id
    {**person(3), "opted_out": "maybe"},  # bad flag
    {**person(4), "shopper_id": "S1", "opted_out": "0"},  # S1 is r1's
    {**person(5), "email": "not an address", "mc_id": "MC5"},  # loaded, invalid email
    {**person(6), "mc_id": "MC5", "opted_out": "no"},  # MC5 is r5's
    {**person(7), "timezone": "Mars/Olympus"},  # bad time zone
]


def test_a_query_loads_with_the_csv_paths_validation_and_reasons(
    source: Source, engine: Engine, tmp_path: Path
) -> None:
    source.write(MIXED)
    from_sql = load_recipients_from_sql(engine, CONN_ID, QUERY, chunk_size=3)

    path = tmp_path / "same.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c) or "" for c in CSV_COLUMNS} for row in MIXED)
    csv_engine = make_engine(f"sqlite:///{tmp_path / 'csv.db'}")
    upgrade_schema(csv_engine)
    from_csv = load_recipients(csv_engine, path, chunk_size=3)

    # "line N" of the file (header = line 1) is "row N-1" of the query
    as_rows = [re.sub(r"^line (\d+)", lambda m: f"row {int(m[1]) - 1}", e) for e in from_csv["examples"]]
    assert from_sql == {**from_csv, "examples": as_rows}
    assert from_sql["loaded"] == 3 and from_sql["rejected"] == 6 and from_sql["invalid_email"] == 1
    assert from_sql["reasons"] == {
        "missing_recipient_id": 1,
        "duplicate_recipient_id": 1,
        "bad_opted_out": 1,
        "shopper_id_taken": 1,
        "mc_id_taken": 1,
        "bad_timezone": 1,
    }
    assert "row 4: recipient_id already given above (recipient_id 'r1')" in from_sql["examples"]
    assert recipients(engine) == recipients(csv_engine)  # the same rows, the same values
    assert recipients(engine)["r2"]["opted_out"] and recipients(engine)["r2"]["email"] == "bob@example.com"


def test_a_source_bigger_than_a_chunk_is_read_in_chunks_with_checks_across_them(
    source: Source, engine: Engine
) -> None:
    rows = [person(n) for n in range(2500)]
    rows[1500] = person(1500, recipient_id="r10")  # repeats row 10's id, two chunks later
    rows[2400] = person(2400, shopper_id="S20")  # S20 is r20's, loaded in the first chunk
    source.write(rows)
    report = load_recipients_from_sql(engine, CONN_ID, QUERY, chunk_size=1000)
    assert report["loaded"] == 2498 and report["inserted"] == 2498
    assert report["reasons"] == {"duplicate_recipient_id": 1, "shopper_id_taken": 1}
    assert report["examples"] == [
        "row 1501: recipient_id already given above (recipient_id 'r10')",
        "row 2401: shopper_id already belongs to another recipient (recipient_id 'r2400')",
    ]
    assert len(recipients(engine)) == 2498


def test_typed_columns_are_read_as_the_csv_would_give_them(source: Source, engine: Engine) -> None:
    """Integers without '.0', booleans and 1/0 as flags, NULL as empty (a reload keeps the flag)."""
    with source.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS typed"))
        conn.execute(text("CREATE TABLE typed (id BIGINT, mail VARCHAR(100), shop BIGINT, optout BOOLEAN)"))
        conn.execute(
            text("INSERT INTO typed VALUES (:id, :mail, :shop, :optout)"),
            [
                {"id": 1, "mail": "one@example.com", "shop": 101, "optout": True},
                {"id": 2, "mail": "two@example.com", "shop": None, "optout": False},
                {"id": 3, "mail": "three@example.com", "shop": 103, "optout": None},
            ],
        )
    query = "SELECT id AS recipient_id, mail AS email, shop AS shopper_id, optout AS opted_out FROM typed"
    report = load_recipients_from_sql(engine, CONN_ID, query)
    assert report["loaded"] == 3 and report["rejected"] == 0, report
    loaded = recipients(engine)
    assert {k: (v["shopper_id"], bool(v["opted_out"])) for k, v in loaded.items()} == {
        "1": ("101", True),
        "2": (None, False),
        "3": ("103", False),
    }


def test_sync_removes_who_is_gone_and_keeps_suppressions_deliveries_and_rejected_rows(
    source: Source, engine: Engine
) -> None:
    source.write([person(n) for n in range(1, 11)])
    assert sync_recipients(engine, CONN_ID, QUERY)["loaded"] == 10
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO suppressions (email, campaign_id, reason, source, created_at) "
                "VALUES ('p3@example.com', '', 'unsubscribed', 'test', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (delivery_id, campaign_id, recipient_id, email, event_id, event_time, "
                "decided_at, status, attempts) VALUES ('d3', 'cart_abandonment', 'r3', 'p3@example.com', "
                "'e3', 0, 0, 'pending', 0)"
            )
        )
    # r3 is gone from the source; r5's row is now rejected (bad flag) but the source still has r5
    rows = [person(n) for n in range(1, 11) if n != 3]
    rows[3] = person(5, opted_out="perhaps")
    source.write(rows)
    report = sync_recipients(engine, CONN_ID, QUERY, max_removed_share=0.1)
    assert (report["removed"], report["before"], report["rejected"]) == (1, 10, 1)
    assert set(recipients(engine)) == {f"r{n}" for n in range(1, 11)} - {"r3"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM suppressions")).scalar_one() == 1
        assert (
            conn.execute(text("SELECT status FROM deliveries WHERE delivery_id = 'd3'")).scalar_one()
            == "pending"
        )
        # the pending email of the removed recipient: delivery's send-time check will not send it
        pending = pd.DataFrame(
            [
                {
                    "delivery_id": "d3",
                    "campaign_id": "cart_abandonment",
                    "recipient_id": "r3",
                    "email": "p3@example.com",
                    "event_id": "e3",
                    "event_time": 0.0,
                }
            ]
        )
        assert still_eligible(conn, load_config(), pending).tolist() == ["unknown_recipient"]


def test_the_guard_refuses_an_empty_source_or_too_many_removals_and_changes_nothing(
    source: Source, engine: Engine
) -> None:
    source.write([person(n) for n in range(1, 11)])
    sync_recipients(engine, CONN_ID, QUERY)
    before = recipients(engine)

    source.write([])
    with pytest.raises(RemovalRefusedError, match="returned no recipient: the sync would remove all 10"):
        sync_recipients(engine, CONN_ID, QUERY, max_removed_share=1.0)
    source.write([person(n, first_name="Changed") for n in range(1, 8)])  # 3 of 10 gone: 30 %
    with pytest.raises(RemovalRefusedError, match=r"remove 3 of 10 recipients \(30%\).*force"):
        sync_recipients(engine, CONN_ID, QUERY, max_removed_share=0.25)
    assert recipients(engine) == before  # not even the upserts of the refused sync

    report = sync_recipients(engine, CONN_ID, QUERY, max_removed_share=0.25, force=True)
    assert report["removed"] == 3 and set(recipients(engine)) == {f"r{n}" for n in range(1, 8)}
    assert all(row["first_name"] == "Changed" for row in recipients(engine).values())


def test_bad_queries_and_connections_are_named(source: Source, engine: Engine, monkeypatch) -> None:
    source.write([person(1)])
    with pytest.raises(AudienceError, match=r"unknown column\(s\) seq in the columns"):
        load_recipients_from_sql(engine, CONN_ID, "SELECT * FROM people")
    with pytest.raises(AudienceError, match="missing column\\(s\\) email"):
        load_recipients_from_sql(engine, CONN_ID, "SELECT recipient_id FROM people")
    with pytest.raises(AudienceError, match=f"the audience query on '{CONN_ID}' failed"):
        load_recipients_from_sql(engine, CONN_ID, "SELECT nothing FROM nowhere")
    with pytest.raises(AudienceError, match="no Airflow connection 'nowhere'.*AIRFLOW_CONN_NOWHERE"):
        load_recipients_from_sql(engine, "nowhere", QUERY)
    monkeypatch.setenv("AIRFLOW_CONN_WEB", json.dumps({"conn_type": "http", "host": "example.com"}))
    with pytest.raises(
        AudienceError, match="'web' \\(type http\\) (is not a SQL database|has no usable hook)"
    ):
        load_recipients_from_sql(engine, "web", QUERY)
    assert recipients(engine) == {}


def test_a_refused_login_is_named_by_its_connection_without_the_password(
    source: Source, engine: Engine, monkeypatch
) -> None:
    """A login the server refuses (here a user it does not know) is an AudienceError naming the
    connection and what to check; the password given never shows in it."""
    raw = json.loads(os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"])
    refused = {**raw, "login": "fix15_nobody", "password": "pw-fix15-not-to-be-shown"}
    monkeypatch.setenv("AIRFLOW_CONN_REFUSED", json.dumps(refused))
    with pytest.raises(AudienceError) as raised:
        load_recipients_from_sql(engine, "refused", QUERY)
    message = str(raised.value)
    assert message.startswith("cannot connect to the audience database of connection 'refused': ")
    assert "check its host, port, login and password" in message
    assert "pw-fix15-not-to-be-shown" not in message


def test_the_cli_loads_from_a_query_file_and_syncs(
    source: Source, engine: Engine, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TRIGGERS_DB_URL", engine.url.render_as_string(hide_password=False))
    source.write([person(n) for n in range(1, 5)] + [{"recipient_id": "", "email": "x@example.com"}])
    query = tmp_path / "audience.sql"
    query.write_text(QUERY)
    assert cli.main(["audience", "load", "--conn-id", CONN_ID, "--sql-file", str(query)]) == 0
    out = capsys.readouterr().out
    assert f"query on {CONN_ID}: 4 loaded (4 new, 0 updated), 1 rejected" in out
    assert "row 5: no recipient_id" in out
    source.write([person(1)])
    assert cli.main(["audience", "sync", "--conn-id", CONN_ID, "--sql", QUERY]) == 1  # 3 of 4: refused
    assert "TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE" in capsys.readouterr().err
    assert cli.main(["audience", "sync", "--conn-id", CONN_ID, "--sql", QUERY, "--force"]) == 0
    assert "3 removed" in capsys.readouterr().out and set(recipients(engine)) == {"r1"}
    assert cli.main(["audience", "load", "--conn-id", CONN_ID]) == 1
    assert "needs --sql QUERY or --sql-file FILE" in capsys.readouterr().err


# any text a source column can hold: UTF-8 (no lone surrogate); NUL too, except in PostgreSQL
def _values(kind: str) -> st.SearchStrategy:
    alphabet = st.characters(codec="utf-8", exclude_characters="\x00" if kind == "postgresql" else "")
    plausible = st.sampled_from(["", " ", "r1", "x@example.com", "true", "0", "maybe", "Europe/Paris", "S1"])
    return st.none() | plausible | st.text(alphabet, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_source_values_never_raise_and_every_row_is_loaded_or_reported(
    source: Source, engine: Engine, data: st.DataObject
) -> None:
    rows = data.draw(
        st.lists(st.fixed_dictionaries({c: _values(source.kind) for c in CSV_COLUMNS}), max_size=12),
        label="rows",
    )
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM recipients"))
    source.write(rows)
    report = load_recipients_from_sql(engine, CONN_ID, QUERY, chunk_size=5)
    assert report["loaded"] + report["rejected"] == len(rows)
    assert sum(report["reasons"].values()) == report["rejected"]
    assert len(recipients(engine)) == report["loaded"]


def test_a_nul_character_is_rejected_from_a_csv_file_too(engine: Engine, tmp_path: Path) -> None:
    """PostgreSQL cannot store NUL: the row is reported, the load goes on (it used to fail whole)."""
    path = tmp_path / "nul.csv"
    path.write_bytes(b"recipient_id,email\nr1,a\x00b@example.com\nr2,ok@example.com\n")
    report = load_recipients(engine, path)
    assert (report["loaded"], report["reasons"]) == (1, {"nul_character": 1})
    assert report["examples"] == [
        "line 2: a value holds a NUL character, which databases cannot store (recipient_id 'r1')"
    ]
