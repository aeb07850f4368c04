"""Property: the deliveries do not depend on how the closed events are split into runs and batches.

For any staged events, one run after every window has closed and any sequence of scheduled
runs (each seeing the events whose windows have closed by then; here every matched trigger has
the same ``unless`` window, so runs see events in time order), with any batch size, write the
same ``deliveries``; and running matching again, even over events reset to ``new``, changes
nothing. On SQLite (fast); tests/integration/test_matching_db.py checks a split on both databases.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from include.config import VALUE_SEPARATOR, dimension_column, parse_config
from include.database.engine import make_engine
from include.database.schema import recipients
from include.database.sql import bulk_write
from include.matching.rules import latest_ready_time
from include.matching.run import match_ready_events
from tests.conftest import upgrade_schema

T0 = 1_767_225_600.0
TRIGGERS = {"cart": "T-CART", "browse": "T-BROWSE", "purchase": "T-BUY"}
CONFIG = parse_config(
    """
pipeline:
  consumer: prop
  topics:
    - name: triggers
      triggers:
        - {name: T-CART, label: cart}
        - {name: T-BROWSE, label: browse}
        - {name: T-BUY, label: purchase}
campaigns:
  - id: cart
    trigger: cart
    identity: {dimension: eVar01, column: shopper_id}
    where: [{dimension: pageName, op: startswith, value: checkout}]
    unless: {trigger: purchase, within: 60s, match_on: products}
    dedupe: 120s
    template: t
    sender: s@example.com
  - id: browse
    trigger: browse
    identity: {field: mcId, column: mc_id}
    unless: {trigger: purchase, within: 60s}
    dedupe: 300s
    template: t
    sender: s@example.com
limits:
  per_recipient: {max: 2, per: 200s}
"""
)
PEOPLE = [  # person 3 is not in the audience; person 2 has opted out
    ("r0", "r0@example.com", "S0", "MC0", False),
    ("r1", "r1@example.com", "S1", "MC1", False),
    ("r2", "r2@example.com", "S2", "MC2", True),
]
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
DELIVERY_COLUMNS = [
    "delivery_id",
    "campaign_id",
    "recipient_id",
    "email",
    "event_id",
    "event_time",
    "status",
    "reason",
]

event_strategy = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["cart", "browse", "purchase"]),
        "person": st.integers(0, 3),
        "t": st.integers(0, 600),
        "by_mc": st.booleans(),  # a purchase names the person by mcId instead of the shopper id
        "page": st.sampled_from(["checkout:cart", "home"]),
        "products": st.lists(st.sampled_from(["A", "B", "C"]), max_size=2),
    }
)


def stage(url: str, events: list[dict[str, Any]]) -> Any:
    engine = make_engine(url)
    table = upgrade_schema(engine, CONFIG.dimensions)
    rows = []
    for number, event in enumerate(events):
        person = event["person"]
        shopper = (
            None
            if event["kind"] == "browse" or (event["kind"] == "purchase" and event["by_mc"])
            else f"S{person}"
        )
        time_gmt = T0 + event["t"]
        dims = {
            "dim_evar01": shopper,
            "dim_pagename": event["page"],
            "dim_products": VALUE_SEPARATOR.join(event["products"]) or None,
        }
        rows.append(
            (
                f"ev{number:03d}",
                str(number),
                "prop",
                TRIGGERS[event["kind"]],
                time_gmt,
                time_gmt,
                "new",
                f"MC{person}",
                "{}",
                *(dims[c] for c in EVENT_COLUMNS[9:]),
            )
        )
    with engine.begin() as conn:
        bulk_write(conn, table, EVENT_COLUMNS, rows)
        bulk_write(conn, recipients, ["recipient_id", "email", "shopper_id", "mc_id", "opted_out"], PEOPLE)
    return engine


def snapshot(engine: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    with engine.connect() as conn:
        decided = pd.read_sql(
            text(f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM deliveries ORDER BY delivery_id"), conn
        )
        statuses = pd.read_sql(text("SELECT event_id, status FROM pipeline_events ORDER BY event_id"), conn)
    return decided, statuses


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event_strategy, max_size=14),
    cuts=st.lists(st.integers(0, 700), max_size=4),
    batch_size=st.sampled_from([1, 2, 3, 1000]),
)
def test_one_run_or_many_runs_and_batches_write_the_same_deliveries(
    events: list[dict[str, Any]], cuts: list[int], batch_size: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        whole = stage(f"sqlite:///{Path(folder) / 'whole.db'}", events)
        split = stage(f"sqlite:///{Path(folder) / 'split.db'}", events)
        end = T0 + 10_000
        counts = match_ready_events(whole, CONFIG, now=end)
        for cut in sorted(cuts):
            match_ready_events(split, CONFIG, now=T0 + cut, batch_size=batch_size)
        match_ready_events(split, CONFIG, now=end, batch_size=batch_size)

        decided, statuses = snapshot(whole)
        split_decided, split_statuses = snapshot(split)
        pd.testing.assert_frame_equal(decided, split_decided)
        pd.testing.assert_frame_equal(statuses, split_statuses)
        assert counts["ready"] == len(events)
        assert counts["pending"] == int((decided["status"] == "pending").sum())
        assert not (statuses["status"] == "new").any()

        # again: nothing is ready; and over the same events made new again, nothing changes
        assert match_ready_events(whole, CONFIG, now=end)["ready"] == 0
        with whole.begin() as conn:
            conn.execute(text("UPDATE pipeline_events SET status = 'new', processed_at = NULL"))
        match_ready_events(whole, CONFIG, now=end, batch_size=batch_size)
        pd.testing.assert_frame_equal(snapshot(whole)[0], decided)
        whole.dispose()
        split.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_strategy, max_size=14), cuts=st.lists(st.integers(0, 700), max_size=4))
def test_backfill_intervals_in_order_write_what_one_run_writes(
    events: list[dict[str, Any]], cuts: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        whole = stage(f"sqlite:///{Path(folder) / 'whole.db'}", events)
        split = stage(f"sqlite:///{Path(folder) / 'split.db'}", events)
        end = T0 + 10_000
        match_ready_events(whole, CONFIG, now=end)
        edges = [T0 - 1, *(T0 + c for c in sorted(set(cuts))), T0 + 1_000]
        for start, stop in zip(edges, edges[1:], strict=False):
            match_ready_events(split, CONFIG, now=end, interval=(start, stop))
        pd.testing.assert_frame_equal(snapshot(whole)[0], snapshot(split)[0])
        whole.dispose()
        split.dispose()


@given(
    now=st.floats(min_value=1e9, max_value=2e9, allow_nan=False),
    hold=st.one_of(st.just(0.0), st.floats(min_value=0.001, max_value=7 * 86_400.0)),
)
def test_latest_ready_time_is_the_exact_edge_of_the_window(now: float, hold: float) -> None:
    edge = latest_ready_time(now, hold)
    assert edge + hold <= now  # an event at the edge is ready, as the window test computes it
    assert math.nextafter(edge, math.inf) + hold > now  # the next representable time is not
