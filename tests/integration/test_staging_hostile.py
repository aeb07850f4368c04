"""Staging takes anything a journal page can carry (issue 12), over real HTTP from the simulator
into SQLite and PostgreSQL: hostile events are staged storable or quarantined with their reason,
never a failed batch; a page that cannot be read stops the drain with the command that skips it;
rows the database refuses are quarantined with its message; two drains at once take turns."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy import event as sqlalchemy_event

from include.adobe.auth import ImsAuthenticator
from include.cli import build_parser
from include.database.engine import make_engine
from include.database.schema import events_table, pipeline_state
from include.errors import PositionMovedError, UnreadablePageError
from include.sandbox.simulator.server import Simulator
from include.staging.drain import SKIP_COMMAND, drain
from include.staging.imports import import_export
from include.staging.parser import dimension_values
from include.staging.stager import Stager, refused_a_value
from tests.integration import test_ingestion as ingestion
from tests.integration.test_ingestion import CART, config, credentials_for, journal, start_simulator

# the fixtures of the ingestion tests: keys, a private token cache, an engine at the schema
key_pair = ingestion.key_pair
private_token_cache = ingestion.private_token_cache
engine = ingestion.engine

PM = b"com.adobe.mcloud.pipeline.pipelineMessage"
TRIGGER = b"com.adobe.mcloud.protocol.trigger"
TABLE = events_table(config().dimensions)


def event(
    name: str, timestamp: bytes = b"", page: bytes = b'"checkout"', trigger: bytes = CART.encode()
) -> bytes:
    """A cart event whose messageId is ``h-<name>``, as raw bytes (any bytes may be spliced in)."""
    timestamp = timestamp or str(int(time.time() * 1000)).encode()
    mid = b"h-" + name.encode()
    return (
        b'{"event_id":"' + mid + b'","event":{"' + PM + b'":{"header":{"messageId":"' + mid + b'"},"'
        + TRIGGER + b'":{"triggerId":"' + trigger + b'","triggerTimestamp":' + timestamp
        + b',"enrichments":{"analyticsHitSummary":{"dimensions":{"eVar01":{"data":["SHOP-1"]},'
        + b'"pageName":{"data":[' + page + b"]}}}}}}}}"
    )  # fmt: skip


def rows_of(engine: Engine, name: str):
    """The rows whose payload names event ``h-<name>``."""
    with engine.connect() as conn:
        return conn.execute(
            select(
                TABLE.c.status, TABLE.c.reason, TABLE.c.dim_pagename, TABLE.c.payload, TABLE.c.time_gmt
            ).where(TABLE.c.payload.like(f'%"h-{name}"%'))
        ).all()


def stored(engine: Engine):
    with engine.connect() as conn:
        return conn.execute(
            select(
                pipeline_state.c.position,
                pipeline_state.c.events_received,
                pipeline_state.c.events_quarantined,
            )
        ).one()


def count_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(TABLE)).scalar_one()


@pytest.fixture
def simulator(key_pair):
    sim = start_simulator(key_pair, events=0)
    yield sim
    sim.stop()


def last_position(sim: Simulator) -> str:
    return sim.journal.codec.encode(sim.journal.length - 1)


HOSTILE = {
    # name: (event bytes, expected status, expected reason or the stored pageName)
    "surrogate": (event("surrogate", page=b'"checkout\\ud83d"'), "new", "checkout\ufffd"),
    "nul": (event("nul", page=b'"check\\u0000out"'), "new", "check\ufffdout"),
    "pair": (event("pair", page=b'"checkout\\ud83d\\ude00"'), "new", "checkout\U0001f600"),
    "nan": (event("nan", b"NaN"), "quarantined", "its time is not finite"),
    "infinity": (event("infinity", b"-Infinity"), "quarantined", "its time is not finite"),
    "negative": (event("negative", b"-5"), "quarantined", "its time is before 2000-01-01"),
    "1999": (event("1999", b"915148800000"), "quarantined", "its time is before 2000-01-01"),
    "future": (
        event("future", str(int((time.time() + 3 * 86400) * 1000)).encode()),
        "quarantined",
        "its time is more than a day after it was received",
    ),
    "huge": (event("huge", b"1" + b"0" * 400), "quarantined", "triggerTimestamp is out of range"),
    "deep": (event("deep", page=b"[" * 100 + b"]" * 100), "quarantined", "nested deeper than 64 levels"),
    "deeper": (
        event("deeper", page=b"[" * 5000 + b"]" * 5000),
        "quarantined",
        "nested deeper than 64 levels",
    ),
    "oversize": (
        event("oversize", page=b'"' + b"x" * 30_000 + b'"'),
        "quarantined",
        "larger than max_msg_size",
    ),
    "latin1": (event("latin1", page=b'"caf\xe9"'), "quarantined", "not valid UTF-8"),
    "broken": (event("broken")[:-5], "quarantined", "not valid JSON"),
    "raw-nul": (event("raw-nul", page=b'"a\x00b"'), "new", "a\ufffdb"),  # made storable, then valid
}


def test_hostile_events_are_staged_storable_or_quarantined_never_a_failed_batch(simulator, key_pair, engine):
    simulator.publish(300)
    simulator.publish_raw_bytes([raw for raw, _, _ in HOSTILE.values()])
    simulator.publish(300)
    report = drain(engine, config(), journal(ImsAuthenticator(credentials_for(simulator, key_pair))))
    assert report.drained and report.received == 600 + len(HOSTILE)
    for name, (_, status, expected) in HOSTILE.items():
        (row,) = rows_of(engine, name)
        assert row.status == status, name
        if status == "new":
            assert row.dim_pagename == expected and row.reason is None
            assert dimension_values(row.payload)["pageName"] == [expected]  # the payload made storable too
        else:
            assert row.reason.startswith(expected), (name, row.reason)
            assert row.payload
    assert "\ufffd" in rows_of(engine, "latin1")[0].payload  # the raw payload, decoded with replacement
    position, received, quarantined = stored(engine)
    assert position == last_position(simulator) and received == report.received
    assert (
        quarantined == report.quarantined >= sum(status == "quarantined" for _, status, _ in HOSTILE.values())
    )


def test_an_unreadable_page_stops_the_drain_at_its_position_until_skipped(simulator, key_pair, engine):
    simulator.publish(600)  # pages of 250: the second one is unreadable
    after_first = simulator.journal.codec.encode(249)
    simulator.faults.replace_page(b"<html>502 Bad Gateway</html>", since=after_first)
    client = journal(ImsAuthenticator(credentials_for(simulator, key_pair)))
    with pytest.raises(UnreadablePageError) as stopped:
        drain(engine, config(), client)
    assert repr(after_first) in str(stopped.value) and SKIP_COMMAND in str(stopped.value)
    assert stored(engine).position == after_first and count_rows(engine) == 250  # the page before it
    report = drain(engine, config(), client, skip_unreadable_page=True)
    assert report.skipped_pages == 1 and report.drained
    assert stored(engine).position == last_position(simulator)
    with engine.connect() as conn:
        skipped = conn.execute(select(TABLE).where(TABLE.c.payload == "<html>502 Bad Gateway</html>")).one()
    assert skipped.status == "quarantined" and skipped.reason.startswith("unreadable journal page")
    assert skipped.position == simulator.journal.codec.encode(499)  # the page's next position
    assert count_rows(engine) == 250 + 1 + 100
    args = build_parser("drain").parse_args(["drain", "--skip-unreadable-page"])
    assert args.skip_unreadable_page


def test_rows_the_database_refuses_are_quarantined_with_its_message(simulator, key_pair, engine):
    with engine.begin() as conn:  # a rule of this database that staging knows nothing of
        if engine.dialect.name == "postgresql":
            conn.execute(
                text("ALTER TABLE pipeline_events ADD CONSTRAINT no_refuse CHECK (trigger_id <> 'refuse-me')")
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER no_refuse BEFORE INSERT ON pipeline_events WHEN NEW.trigger_id = 'refuse-me' "
                    "BEGIN SELECT RAISE(ABORT, 'no_refuse: refuse-me is refused'); END"
                )
            )
    # and an identity longer than PostgreSQL's key index takes (SQLite stores it)
    long_id = b"h-long-" + secrets.token_hex(5000).encode()
    simulator.publish(200)
    simulator.publish_raw_bytes([event("refused", trigger=b"refuse-me"), event("x").replace(b"h-x", long_id)])
    simulator.publish(200)
    report = drain(engine, config(), journal(ImsAuthenticator(credentials_for(simulator, key_pair))))
    assert report.drained and report.refused == (2 if engine.dialect.name == "postgresql" else 1)
    ((long_status, long_reason, *_),) = rows_of(engine, "long-" + long_id[7:].decode())
    if engine.dialect.name == "postgresql":
        assert long_status == "quarantined" and "index row" in long_reason
    ((status, reason, *_),) = rows_of(engine, "refused")
    assert (
        status == "quarantined" and reason.startswith("refused by the database: ") and "no_refuse" in reason
    )
    assert stored(engine).position == last_position(simulator)
    assert count_rows(engine) == report.staged


def test_two_drains_at_once_take_turns_and_stage_each_event_once(simulator, key_pair, engine, db_url):
    simulator.publish(3000)
    simulator.faults.slow_seconds = 0.02  # the drains overlap for certain
    reports, errors = [], []

    def run() -> None:
        own = make_engine(db_url)
        try:
            reports.append(
                drain(own, config(), journal(ImsAuthenticator(credentials_for(simulator, key_pair))))
            )
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    position, received, _ = stored(engine)
    assert position == last_position(simulator) and received == 3000  # each event received once
    assert sorted(r.received for r in reports) == [0, 3000]
    assert count_rows(engine) == sum(r.staged for r in reports)


def test_the_position_moves_only_from_where_the_stager_read_it(engine):
    first, second = Stager(engine, config()), Stager(engine, config())
    first.position(), second.position()
    page = b'{"events":[{"position":"p%d","event":{"event_id":"e%d","triggerId":"t"}}]}'
    second.stage(second.parser.parse_page(page % (1, 1), time.time()), pipeline_host="h", fetched_at=1)
    with pytest.raises(PositionMovedError, match="another drain moved it"):
        first.stage(first.parser.parse_page(page % (2, 2), time.time()), pipeline_host="h", fetched_at=2)
    assert stored(engine).position == "p1" and count_rows(engine) == 1  # the refused batch rolled back


def test_an_export_with_hostile_lines_is_imported_whole(engine, tmp_path):
    export = tmp_path / "export.jsonl"
    export.write_bytes(
        b"\n".join(
            [
                event("ok"),
                event("surrogate", page=b'"checkout\\ud83d"'),
                event("latin1", page=b'"caf\xe9"'),
                b"{not json",
            ]
        )
    )
    counts = import_export(engine, config(), str(export))
    assert counts == {"lines": 4, "staged": 4, "quarantined": 2, "ignored": 0}
    assert rows_of(engine, "surrogate")[0].dim_pagename == "checkout\ufffd"
    assert rows_of(engine, "latin1")[0].reason.startswith("not valid UTF-8")


def test_the_simulator_publishes_exact_bytes_over_http(simulator):
    raw = [base64.b64encode(event("http", page=b'"caf\xe9"')).decode()]
    answer = requests.post(f"{simulator.url}/_sim/publish", json={"raw_base64": raw}, timeout=10)
    assert answer.json() == {"length": 1}
    assert b'"caf\xe9"' in b"".join(bytes(chunk) for chunk in simulator.journal.page(0, 1).chunks)
    refused = requests.post(f"{simulator.url}/_sim/publish", json={"raw_base64": ["%%"]}, timeout=10)
    assert refused.status_code == 400


def impatient_engine(db_url: str) -> Engine:
    """An engine of the staging database that gives up on a lock after 0.2 s."""
    if db_url.startswith("postgresql"):
        return create_engine(db_url, connect_args={"options": "-c lock_timeout=200"})
    own = make_engine(db_url)

    @sqlalchemy_event.listens_for(own, "connect")  # after make_engine's pragmas
    def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=200")

    return own


def test_a_lock_stops_the_stage_and_never_quarantines_an_event(engine, db_url, caplog):
    """A lock is not the row's fault: the stage fails as a whole (the next run retries) instead of
    writing row by row, where a lock released midway would quarantine good events."""
    impatient = impatient_engine(db_url)
    stager = Stager(impatient, config())
    stager.position()
    page = stager.parser.parse_page(
        b'{"events":[{"position":"p1","event":{"event_id":"e1","triggerId":"%s"}}]}' % CART.encode(), 1.0
    )
    holder = engine.connect()
    try:
        if engine.dialect.name == "postgresql":
            holder.execute(text("LOCK TABLE pipeline_events IN ACCESS EXCLUSIVE MODE"))
        else:
            holder.exec_driver_sql("UPDATE pipeline_state SET position = position")  # takes the write lock
        with caplog.at_level("WARNING"), pytest.raises(Exception, match="lock") as refused:
            stager.stage(page, pipeline_host="h", fetched_at=1)
        assert not refused_a_value(refused.value)
        assert "row by row" not in caplog.text
    finally:
        holder.rollback()
        holder.close()
    assert count_rows(engine) == 0
    stager.stage(page, pipeline_host="h", fetched_at=1)  # the next run stages it as it is
    with engine.connect() as conn:
        assert conn.execute(select(TABLE.c.event_id, TABLE.c.status)).all() == [("e1", "new")]
    assert stored(engine).position == "p1"
    impatient.dispose()
