"""Matching against real databases (SQLite and PostgreSQL): readiness, writes, reruns, send-time checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, inspect, text

from include.config import VALUE_SEPARATOR, dimension_column, parse_config
from include.database.engine import make_engine
from include.database.schema import recipients
from include.database.sql import bulk_write
from include.delivery.eligibility import still_eligible
from include.matching.reading import AudienceReader, advance_frontier, read_frontier
from include.matching.rules import compile_rules
from include.matching.run import match_ready_events
from include.matching.writer import DELIVERY_COLUMNS, BatchWriter, write_batch
from tests.conftest import new_database_url, upgrade_schema

T0 = 1_767_225_600.0
MINUTE, HOUR = 60.0, 3600.0
TRIGGERS = {"cart": "T-CART", "browse": "T-BROWSE", "purchase": "T-BUY", "other": "T-OTHER"}
CONFIG_TEXT = """
pipeline:
  consumer: it
  topics:
    - name: triggers
      triggers:
        - {name: T-CART, label: cart}
        - {name: T-BROWSE, label: browse}
        - {name: T-BUY, label: purchase}
        - {name: T-OTHER, label: other}
campaigns:
  - id: cart_abandonment
    trigger: cart
    identity: {dimension: eVar01, column: shopper_id}
    where: [{dimension: pageName, op: startswith, value: checkout}]
    unless: {trigger: purchase, within: 30m, match_on: products}
    dedupe: 24h
    template: cart_abandonment
    sender: "Shop <shop@example.com>"
  - id: browse_abandonment
    trigger: browse
    identity: {field: mcId, column: mc_id}
    dedupe: 24h
    template: browse_abandonment
    sender: "Shop <shop@example.com>"
limits:
  per_recipient: {max: 3, per: 24h}
"""
CONFIG = parse_config(CONFIG_TEXT)
EVENT_COLUMNS = [
    "event_id",
    "position",
    "consumer",
    "trigger_id",
    "time_gmt",
    "received_at",
    "status",
    "mc_id",
    "payload",
    *(dimension_column(d) for d in CONFIG.dimensions),
]
PEOPLE = [
    ("r1", "ann@example.com", "S1", "MC1", False),
    ("r2", "bob@example.com", "S2", "MC2", False),
    ("r3", "cid@example.com", "S3", "MC3", True),
]


def stage(engine: Engine, *events: dict[str, Any], status: str = "new") -> None:
    table = upgrade_schema(engine, CONFIG.dimensions)
    rows = []
    for event in events:
        dims = {
            "dim_evar01": event.get("shopper"),
            "dim_pagename": event.get("page", "checkout:cart"),
            "dim_products": VALUE_SEPARATOR.join(event.get("products", [])) or None,
        }
        rows.append(
            (
                event["id"],
                event["id"],
                "it",
                TRIGGERS[event["kind"]],
                event["t"],
                event["t"],
                event.get("status", status),
                event.get("mc"),
                "{}",
                *(dims[c] for c in EVENT_COLUMNS[9:]),
            )
        )
    with engine.begin() as conn:
        bulk_write(conn, table, EVENT_COLUMNS, rows)


def audience(engine: Engine, people: list[tuple[Any, ...]] = PEOPLE) -> None:
    upgrade_schema(engine, CONFIG.dimensions)
    with engine.begin() as conn:
        bulk_write(
            conn,
            recipients,
            ["recipient_id", "email", "shopper_id", "mc_id", "opted_out"],
            people,
            conflict="update",
        )


def deliveries_of(engine: Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(
            text(
                "SELECT delivery_id, campaign_id, recipient_id, email, event_id, event_time, status, reason, attempts "
                "FROM deliveries ORDER BY event_time, event_id, campaign_id"
            ),
            conn,
        )


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT event_id, status FROM pipeline_events")).fetchall())


@pytest.fixture
def staged(engine: Engine) -> Engine:
    audience(engine)
    stage(
        engine,
        {"id": "cart-1", "kind": "cart", "shopper": "S1", "mc": "MC1", "products": ["SKU-1"], "t": T0},
        {"id": "buy-1", "kind": "purchase", "mc": "MC1", "products": ["SKU-1"], "t": T0 + 10 * MINUTE},
        {"id": "cart-2", "kind": "cart", "shopper": "S2", "products": ["SKU-2"], "t": T0 + MINUTE},
        {"id": "browse-2", "kind": "browse", "mc": "MC2", "t": T0 + 2 * MINUTE},
        {"id": "browse-3", "kind": "browse", "mc": "MC3", "t": T0 + 3 * MINUTE},
        {"id": "cart-x", "kind": "cart", "shopper": "S404", "t": T0 + 4 * MINUTE},
        {"id": "cart-home", "kind": "cart", "shopper": "S1", "page": "home", "t": T0 + 5 * MINUTE},
        {"id": "other-1", "kind": "other", "mc": "MC1", "t": T0 + 6 * MINUTE},
    )
    return engine


def test_a_run_decides_only_events_whose_windows_have_closed(staged: Engine) -> None:
    # 20 minutes in: the carts (30 min unless) wait; browse, purchase, other are ready at once
    counts = match_ready_events(staged, CONFIG, now=T0 + 20 * MINUTE)
    assert counts == {
        "ready": 4,
        "matched": 2,
        "unmatched": 2,
        "pending": 1,
        "suppressed_opted_out": 1,
    }
    assert statuses(staged) == {
        "cart-1": "new",
        "buy-1": "unmatched",
        "cart-2": "new",
        "browse-2": "matched",
        "browse-3": "matched",
        "cart-x": "new",
        "cart-home": "new",
        "other-1": "unmatched",
    }
    # exactly at the end of cart-1's window it is ready; cart-2 (a minute later) is not
    counts = match_ready_events(staged, CONFIG, now=T0 + 30 * MINUTE)
    assert counts["ready"] == 1 and counts["suppressed_cancelled_by:purchase"] == 1
    counts = match_ready_events(staged, CONFIG, now=T0 + HOUR)
    assert counts == {
        "ready": 3,
        "matched": 2,
        "unmatched": 1,
        "pending": 1,
        "suppressed_unknown_recipient": 1,
    }

    decided = deliveries_of(staged)
    assert list(zip(decided["event_id"], decided["status"], decided["reason"].fillna(""), strict=True)) == [
        ("cart-1", "suppressed", "cancelled_by:purchase"),  # same person through mcId, same SKU
        ("cart-2", "pending", ""),
        ("browse-2", "pending", ""),
        ("browse-3", "suppressed", "opted_out"),
        ("cart-x", "suppressed", "unknown_recipient"),
    ]
    assert decided.loc[1, "email"] == "bob@example.com" and decided.loc[1, "recipient_id"] == "r2"
    assert decided["attempts"].tolist() == [0] * 5
    assert decided["delivery_id"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert set(statuses(staged).values()) == {"matched", "unmatched"}


def test_a_rerun_changes_nothing_even_over_events_made_new_again(staged: Engine) -> None:
    match_ready_events(staged, CONFIG, now=T0 + HOUR)
    before = deliveries_of(staged)
    assert match_ready_events(staged, CONFIG, now=T0 + HOUR)["ready"] == 0
    with staged.begin() as conn:
        conn.execute(text("UPDATE pipeline_events SET status = 'new'"))
    match_ready_events(staged, CONFIG, now=T0 + HOUR, batch_size=2)
    pd.testing.assert_frame_equal(deliveries_of(staged), before)


def test_a_backfill_run_decides_the_events_of_its_interval_only(staged: Engine) -> None:
    counts = match_ready_events(staged, CONFIG, now=T0 + HOUR, interval=(T0 + MINUTE, T0 + 4 * MINUTE))
    assert counts["ready"] == 3  # cart-2, browse-2, browse-3; cart-x starts at the interval's end
    assert {e for e, s in statuses(staged).items() if s != "new"} == {"cart-2", "browse-2", "browse-3"}


def test_small_batches_and_either_way_of_reading_the_audience_decide_the_same(
    staged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    match_ready_events(staged, CONFIG, now=T0 + HOUR, batch_size=1000)
    expected = deliveries_of(staged).drop(columns=[])
    for factor in (0, 10**9):  # 0: look recipients up per batch; huge: read them all once
        with staged.begin() as conn:
            conn.execute(text("DELETE FROM deliveries"))
            conn.execute(text("UPDATE pipeline_events SET status = 'new'"))
        monkeypatch.setattr(AudienceReader, "FULL_READ_FACTOR", factor)
        match_ready_events(staged, CONFIG, now=T0 + HOUR, batch_size=2)
        pd.testing.assert_frame_equal(deliveries_of(staged), expected)


def test_batches_written_beside_the_next_decision_write_what_inline_writes(
    staged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    match_ready_events(staged, CONFIG, now=T0 + HOUR)  # one batch, written in this thread
    expected, expected_statuses = deliveries_of(staged), statuses(staged)
    with staged.begin() as conn:
        conn.execute(text("DELETE FROM deliveries"))
        conn.execute(text("UPDATE pipeline_events SET status = 'new'"))
    monkeypatch.setattr(BatchWriter, "PROCESS_MIN_EVENTS", 1)  # a writer process from the first batch
    match_ready_events(staged, CONFIG, now=T0 + HOUR, batch_size=2)
    pd.testing.assert_frame_equal(deliveries_of(staged), expected)
    assert statuses(staged) == expected_statuses


def test_a_batch_that_cannot_be_written_stops_the_run_and_nothing_after_it_is_written(
    staged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with staged.begin() as conn:  # the database refuses browse-2's decision
        if staged.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN IF NEW.event_id = 'browse-2' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON deliveries FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON deliveries WHEN NEW.event_id = 'browse-2' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
    monkeypatch.setattr(BatchWriter, "PROCESS_MIN_EVENTS", 1)
    with pytest.raises(Exception, match="refused"):
        match_ready_events(staged, CONFIG, now=T0 + HOUR, batch_size=2)
    # in time order: cart-1 and cart-2, then browse-2 with browse-3 (refused): nothing after is written
    decided = statuses(staged)
    assert {e for e, s in decided.items() if s != "new"} == {"cart-1", "cart-2"}
    assert set(deliveries_of(staged)["event_id"]) == {"cart-1", "cart-2"}


def test_split_runs_on_this_database_write_what_one_run_writes(engine: Engine) -> None:
    audience(engine)
    events = (
        [
            {"id": f"b{n:02d}", "kind": "browse", "mc": f"MC{1 + n % 2}", "t": T0 + n * 7 * HOUR}
            for n in range(8)
        ]
        + [
            {"id": f"c{n:02d}", "kind": "cart", "shopper": "S1", "products": ["A"], "t": T0 + n * 5 * HOUR}
            for n in range(6)
        ]
        + [{"id": "p1", "kind": "purchase", "shopper": "S1", "products": ["A"], "t": T0 + 10 * HOUR + MINUTE}]
    )
    stage(engine, *events)
    config = parse_config(CONFIG_TEXT.replace("max: 3", "max: 1"))
    for hours in (3, 9, 20, 21, 40):
        match_ready_events(engine, config, now=T0 + hours * HOUR, batch_size=2)
    match_ready_events(engine, config, now=T0 + 100 * HOUR, batch_size=2)
    split = deliveries_of(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM deliveries"))
        conn.execute(text("UPDATE pipeline_events SET status = 'new'"))
    match_ready_events(engine, config, now=T0 + 100 * HOUR)
    pd.testing.assert_frame_equal(deliveries_of(engine), split)
    assert set(split["reason"].dropna()) == {"dedupe", "frequency_cap", "cancelled_by:purchase"}


def test_dedupe_and_cap_remember_live_deliveries_but_not_failed_or_suppressed(engine: Engine) -> None:
    audience(engine)
    stage(engine, {"id": "b-new", "kind": "browse", "mc": "MC1", "t": T0})
    base = {
        "campaign_id": "browse_abandonment",
        "recipient_id": "r1",
        "email": "ann@example.com",
        "event_time": T0 - HOUR,
        "decided_at": T0,
        "attempts": 0,
    }
    upgrade_schema(engine, CONFIG.dimensions)
    from include.database.schema import deliveries

    for status, expected in [("failed", "pending"), ("suppressed", "pending"), ("sent", "dedupe")]:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM deliveries"))
            conn.execute(text("UPDATE pipeline_events SET status = 'new'"))
            row = {**base, "delivery_id": f"old-{status}", "event_id": "old", "status": status}
            bulk_write(conn, deliveries, list(row), [tuple(row.values())])
        match_ready_events(engine, CONFIG, now=T0)
        new = deliveries_of(engine).query("event_id == 'b-new'")
        assert (new["reason"].fillna("pending") == expected).all(), status


def test_the_cancelling_event_is_found_whatever_its_status(engine: Engine) -> None:
    audience(engine)
    stage(engine, {"id": "cart", "kind": "cart", "shopper": "S1", "products": ["A"], "t": T0})
    stage(
        engine,
        {"id": "buy", "kind": "purchase", "shopper": "S1", "products": ["A"], "t": T0 + MINUTE},
        status="unmatched",
    )
    match_ready_events(engine, CONFIG, now=T0 + HOUR)
    assert deliveries_of(engine)["reason"].tolist() == ["cancelled_by:purchase"]


def test_still_eligible_rechecks_opt_out_email_and_late_cancelling_events(engine: Engine) -> None:
    audience(
        engine,
        [
            *PEOPLE,
            ("r4", "dan@example.com", "S4", "MC4", False),
            ("r5", "eve@example.com", "S5", "MC5", False),
        ],
    )
    stage(
        engine,
        {"id": "c1", "kind": "cart", "shopper": "S1", "products": ["A", "B"], "t": T0},
        {"id": "c2", "kind": "cart", "shopper": "S2", "products": ["A"], "t": T0},
        {"id": "c4", "kind": "cart", "shopper": "S4", "products": ["A"], "t": T0},
        {"id": "c5", "kind": "cart", "shopper": "S5", "products": ["A"], "t": T0},
        {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0},
    )
    match_ready_events(engine, CONFIG, now=T0 + HOUR)
    pending = deliveries_of(engine)
    assert (pending["status"] == "pending").all() and len(pending) == 5
    # after the decision: r2 opts out, r4's address turns invalid, r1 buys SKU B (by mcId, late),
    # r5 buys something else
    audience(
        engine, [("r2", "bob@example.com", "S2", "MC2", True), ("r4", "dan at example", "S4", "MC4", False)]
    )
    stage(
        engine,
        {"id": "late-buy", "kind": "purchase", "mc": "MC1", "products": ["B"], "t": T0 + 20 * MINUTE},
        {"id": "other-buy", "kind": "purchase", "shopper": "S5", "products": ["Z"], "t": T0 + 20 * MINUTE},
    )
    rows = pending[["delivery_id", "campaign_id", "recipient_id", "event_id", "event_time"]]
    first_cart = rows[rows["event_id"] == "c1"].iloc[0].to_dict()
    rows = pd.concat([rows, pd.DataFrame([{**first_cart, "delivery_id": "gone", "campaign_id": "removed"}])])
    rows.index = [f"i{n}" for n in range(len(rows))]
    with engine.connect() as conn:
        reasons = still_eligible(conn, CONFIG, rows)
    assert reasons.index.tolist() == rows.index.tolist()
    by_event = dict(zip(rows["event_id"] + "/" + rows["campaign_id"], reasons, strict=True))
    assert by_event == {
        "c1/cart_abandonment": "cancelled_by:purchase",
        "c2/cart_abandonment": "opted_out",
        "c4/cart_abandonment": "invalid_email",
        "c5/cart_abandonment": None,
        "b1/browse_abandonment": None,  # browse has no unless
        "c1/removed": "unknown_campaign",
    }
    with engine.connect() as conn:
        assert still_eligible(conn, CONFIG, rows.iloc[:0]).empty


def frontier_of(engine: Engine) -> dict[str, tuple[float, int]]:
    with engine.connect() as conn:
        return {row.trigger_id: (row.low_time, row.version) for row in read_frontier(conn)}


def test_the_frontier_follows_the_holds_and_an_event_staged_late_with_an_old_time_is_still_decided(
    staged: Engine,
) -> None:
    assert frontier_of(staged)["T-CART"][0] == T0  # the oldest new cart
    match_ready_events(staged, CONFIG, now=T0 + 20 * MINUTE)
    # carts hold 30 minutes: none older than 20 - 30 minutes can wait; the rest have no hold
    assert frontier_of(staged)["T-CART"][0] == T0  # its low was already lower
    assert frontier_of(staged)["T-BROWSE"][0] == T0 + 20 * MINUTE
    # a browse event from before the frontier, staged now (a late page of the journal)
    stage(staged, {"id": "browse-late", "kind": "browse", "mc": "MC1", "t": T0 - HOUR})
    assert frontier_of(staged)["T-BROWSE"][0] == T0 - HOUR
    counts = match_ready_events(staged, CONFIG, now=T0 + 21 * MINUTE)
    assert counts["ready"] == 1 and statuses(staged)["browse-late"] == "matched"
    assert frontier_of(staged)["T-BROWSE"][0] == T0 + 21 * MINUTE


def test_a_run_leaves_the_frontier_where_it_was_when_an_event_was_staged_during_it(staged: Engine) -> None:
    with staged.connect() as conn:
        read_at_start = read_frontier(conn)
    match_ready_events(staged, CONFIG, now=T0 + 20 * MINUTE)
    stage(staged, {"id": "browse-during", "kind": "browse", "mc": "MC1", "t": T0 - HOUR})  # unseen by the run
    with staged.begin() as conn:
        advance_frontier(conn, compile_rules(CONFIG), read_at_start, T0 + 20 * MINUTE)  # the run ends
    assert frontier_of(staged)["T-BROWSE"][0] == T0 - HOUR
    assert match_ready_events(staged, CONFIG, now=T0 + 20 * MINUTE)["ready"] == 1


def test_an_event_set_back_to_new_by_hand_is_decided_again(staged: Engine) -> None:
    match_ready_events(staged, CONFIG, now=T0 + HOUR)
    assert frontier_of(staged)["T-BROWSE"][0] == T0 + HOUR
    with staged.begin() as conn:
        conn.execute(text("DELETE FROM deliveries WHERE event_id = 'browse-2'"))
        conn.execute(text("UPDATE pipeline_events SET status = 'new' WHERE event_id = 'browse-2'"))
    assert frontier_of(staged)["T-BROWSE"][0] == T0 + 2 * MINUTE
    assert match_ready_events(staged, CONFIG, now=T0 + HOUR) == {
        "ready": 1,
        "matched": 1,
        "unmatched": 0,
        "pending": 1,
    }


def test_a_database_staged_before_the_frontier_gets_one_and_loses_the_status_index(engine: Engine) -> None:
    audience(engine)
    stage(engine, {"id": "browse-old", "kind": "browse", "mc": "MC1", "t": T0})
    with engine.begin() as conn:  # as an older version left it: no triggers, no frontier, a status index
        for name in ("pipeline_events_frontier", "pipeline_events_frontier_requeued"):
            conn.execute(
                text(
                    f"DROP TRIGGER {name}"
                    + (" ON pipeline_events" if engine.dialect.name == "postgresql" else "")
                )
            )
        conn.execute(text("DELETE FROM matching_frontier"))
        conn.execute(
            text("CREATE INDEX ix_pipeline_events_status_time ON pipeline_events (status, time_gmt)")
        )
        conn.execute(text("DROP INDEX ix_pipeline_events_trigger_time"))
        conn.execute(text("DROP INDEX ix_deliveries_next"))
        conn.execute(text("CREATE INDEX ix_deliveries_due ON deliveries (status, decided_at, delivery_id)"))
        conn.execute(text("DROP TABLE triggers_schema_version"))  # older versions had no schema version
    assert frontier_of(engine) == {}
    upgrade_schema(engine, CONFIG.dimensions)
    assert frontier_of(engine) == {"T-BROWSE": (T0, 1)}
    with engine.connect() as conn:
        indexes = {
            i["name"] for table in ("pipeline_events", "deliveries") for i in inspect(conn).get_indexes(table)
        }
    assert {"ix_pipeline_events_trigger_time", "ix_deliveries_next"} <= indexes
    assert not {"ix_pipeline_events_status_time", "ix_deliveries_due"} & indexes
    assert match_ready_events(engine, CONFIG, now=T0 + HOUR)["matched"] == 1


@pytest.mark.postgres
def test_marking_events_rewrites_only_their_rows_on_postgresql(tmp_path: Path) -> None:
    url = new_database_url("postgresql", tmp_path)
    engine = make_engine(next(url))
    audience(engine)
    stage(engine, *({"id": f"b{n}", "kind": "browse", "mc": "MC1", "t": T0 + n} for n in range(200)))
    with engine.connect() as conn:
        events = pd.read_sql(text("SELECT event_id, ctid::text AS row_key FROM pipeline_events"), conn)
    with engine.begin() as conn:  # heap-only updates: no index entry written, room left by the fillfactor
        write_batch(conn, events, pd.DataFrame(columns=list(DELIVERY_COLUMNS)), T0)
        hot = conn.execute(
            text("SELECT pg_stat_get_xact_tuples_hot_updated('pipeline_events'::regclass)")
        ).scalar_one()
        updated = conn.execute(
            text("SELECT pg_stat_get_xact_tuples_updated('pipeline_events'::regclass)")
        ).scalar_one()
    engine.dispose()
    url.close()
    # the new versions are a little longer (status, processed_at): a page's last rows may not fit
    assert updated == 200 and hot >= 0.8 * updated
