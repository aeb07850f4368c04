"""The page parser takes anything (issue 12): hypothesis builds pages of arbitrary JSON values and
arbitrary bytes (lone surrogates, NUL, NaN and Infinity, huge and negative numbers, deep nesting,
invalid UTF-8, oversize and cut events); parsing never raises, gives one storable row per item,
and the typed path agrees with the generic one. ``hostile_pages`` also feeds the staging write
(tests/integration/test_staging_property.py)."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include.config import parse_config
from include.staging.parser import EventParser

CART = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
PM = "com.adobe.mcloud.pipeline.pipelineMessage"
TRIGGER = "com.adobe.mcloud.protocol.trigger"
MAX_MSG_SIZE = 3000
CONFIG = parse_config(f"""
pipeline:
  consumer: customer_dev
  max_msg_size: {MAX_MSG_SIZE}
  topics: [{{name: triggers, triggers: [{{name: {CART}, label: cart_abandonment}}]}}]
campaigns:
  - id: cart
    trigger: cart_abandonment
    identity: {{dimension: eVar01, column: shopper_id}}
    where: [{{dimension: pageName, op: startswith, value: checkout}}]
    template: cart_abandonment
    sender: shop@example.com
""")
PARSER = EventParser(CONFIG)
NOW = time.time()

hostile_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),  # surrogates included
    st.sampled_from(["checkout\ud83d", "a\x00b", "\udfff", "\ud83d\ude00", "\\u0000", "\ufffd", ""]),
)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(
        [10**400, -(10**400), 0, -5, 915148800000, int(NOW * 1000), int((NOW + 3 * 86400) * 1000)]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | hostile_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(hostile_text, children, max_size=3),
    max_leaves=8,
)
trigger_events = st.builds(
    lambda event_id, trigger_id, timestamp, mc_id, data: {
        "event_id": event_id,
        "event": {
            PM: {
                "header": {"messageId": event_id},
                TRIGGER: {
                    "triggerId": trigger_id,
                    "triggerTimestamp": timestamp,
                    "mcId": mc_id,
                    "enrichments": {"analyticsHitSummary": {"dimensions": {"eVar01": {"data": data}}}},
                },
            }
        },
    },
    st.one_of(hostile_text, json_values),
    st.one_of(st.just(CART), hostile_text, json_values),
    st.one_of(st.just(int(NOW * 1000)), numbers, json_values),
    json_values,
    st.one_of(st.lists(json_values, max_size=3), json_values),
)


def _encoded(value: object, ascii_only: bool) -> bytes:
    """JSON bytes as a sender might write them: escaped, or raw UTF-8 with lone surrogates as the
    invalid bytes that a careless encoder emits."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


events = st.one_of(
    st.builds(_encoded, st.one_of(trigger_events, json_values), st.booleans()),
    st.binary(max_size=24),  # invalid UTF-8, invalid JSON
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.builds(lambda e: e[: len(e) // 2], st.builds(_encoded, trigger_events, st.just(True))),  # cut
    st.just(b'"' + b"x" * (MAX_MSG_SIZE + 10) + b'"'),  # oversize
)


def page_of(items: list[bytes]) -> bytes:
    """A page of these events; one holding an item's own head (``"position"``) is left out: where
    the page is broken, that is where the next item begins (both parts are quarantined)."""
    items = [item for item in items if b'"position"' not in item] or [b"null"]
    body = b",".join(b'{"position":"p%d","event":%s}' % (i, item) for i, item in enumerate(items))
    return b'{"events":[' + body + b'],"_page":{"last":"p%d"}}' % (len(items) - 1)


hostile_pages = st.lists(events, min_size=1, max_size=6)


def storable(value: object) -> bool:
    return not isinstance(value, str) or ("\x00" not in value and value.encode("utf-8", "strict") is not None)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_pages)
def test_any_page_parses_to_one_storable_row_per_item(items: list[bytes]) -> None:
    body = page_of(items)
    items = [item for item in items if b'"position"' not in item] or [b"null"]
    page = PARSER.parse_page(body, NOW)
    rows = [dict(zip(page.columns, row, strict=True)) for row in page.rows()]
    assert page.count == len(rows) == len(items)
    assert [row["position"] for row in rows] == [f"p{i}" for i in range(len(items))]
    assert page.last_position == f"p{len(items) - 1}"
    for row in rows:
        assert all(storable(value) for value in row.values()), row
        assert row["status"] in ("new", "ignored", "quarantined")
        assert (row["status"] == "quarantined") == bool(row["reason"])
        if row["status"] != "quarantined":
            assert 946_684_800 <= row["time_gmt"] <= NOW + 86_400
    assert page.rows() == PARSER._parse_page_generic(body, NOW).rows()  # both paths agree
