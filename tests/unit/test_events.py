"""Page parsing: the typed msgspec path gives the same rows as the generic path it falls back to."""

from __future__ import annotations

import json

import pytest

from include.config import parse_config
from include.sandbox.simulator.journal import Journal
from include.sandbox.simulator.options import SimulatorOptions
from include.staging.parser import EventParser

NOW = 1.7e9 + 10_000  # the receive time: after the simulator's events (times are checked against it)
CART = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
PM = "com.adobe.mcloud.pipeline.pipelineMessage"
TRIGGER = "com.adobe.mcloud.protocol.trigger"
PARSER = EventParser(
    parse_config(f"""
pipeline:
  consumer: customer_dev
  max_msg_size: 2000
  topics: [{{name: triggers, triggers: [{{name: {CART}, label: cart_abandonment}}]}}]
campaigns:
  - id: cart
    trigger: cart_abandonment
    identity: {{dimension: eVar01, column: shopper_id}}
    where: [{{dimension: pageName, op: startswith, value: checkout}}]
    template: cart_abandonment
    sender: shop@example.com
""")
)


def envelope(trigger, header=None, **top):
    message = {TRIGGER: trigger} if header is None else {"header": header, TRIGGER: trigger}
    return json.dumps({"event_id": "e-1", "event": {"createTime": 7000, PM: message}, **top})


# Each of these takes a different turn in the reading of SPEC section 3; most leave the typed
# path, and their rows must not change when they do.
EVENTS = [
    envelope(
        {
            "triggerId": f" {CART} ",
            "mcId": 0,
            "enrichments": {
                "analyticsHitSummary": {
                    "dimensions": {
                        " eVar01": {"data": ["SHOP-1", None, "", 3, True, "a\x1fb"]},
                        "pageName": {"data": "not a list"},
                    }
                }
            },
        },
        {"messageId": "", "sentTime": 5000},
    ),
    envelope({"triggerId": CART, "triggerTimestamp": 1.5e12, "timeGMT": "late"}, {"messageId": 12}),
    envelope({"triggerId": CART, "triggerTimestamp": True}),
    envelope({"triggerId": CART, "enrichments": []}),
    envelope({"triggerId": CART, "enrichments": {"analyticsHitSummary": {"dimensions": {"eVar01": 5}}}}),
    envelope({"triggerId": CART}, "not a header"),
    envelope(None),
    envelope({"triggerId": 5}),
    envelope({"triggerId": "  "}),
    envelope({"triggerId": CART, "padding": "x" * 3000}),
    envelope({"triggerId": CART, "mcId": 123456789012345678901234567890, "timeGMT": 1e400}),
    json.dumps({PM: {TRIGGER: {"triggerId": CART}}, "createTime": 9000}),  # message beside, not in, "event"
    json.dumps({"event": 5, "triggerId": CART, "timeGMT": 3}),
    json.dumps(
        {
            "triggerId": "other",
            "timeGMT": 12.5,
            "mcId": "m",
            "enrichments": {
                "analyticsHitSummary": {
                    "dimensions": {" eVar01": {"data": ["first"]}, "eVar01": {"data": ["second"]}}
                }
            },
        }
    ),
    json.dumps(
        {"triggerId": CART, "event_id": {"nested": 1}, "text": "caf\u00e9 \U0001f600"}, ensure_ascii=False
    ),
    json.dumps({"triggerId": CART, "text": "\u00e9\n"}),  # escapes kept as sent
    '{"triggerId":"' + CART + '","event_id":"d","timeGMT":1,"timeGMT":"duplicate keys: the last one counts"}',
    '"a string"',
    "[1, 2]",
    "null",
    "12",
    "{}",
]


def rows(page):
    return page.values, page.last_position, page.count, page.quarantined, page.ignored, page.reasons


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    "layout",
    [
        '{{"events":[{{"position":"p1","event":{event}}},{{"event":{{"triggerId":"{cart}"}}}}],"_page":{{"last":"L"}}}}',
        '{{ "_page" : {{"last": 3}} ,\n "events" : [ {{ "event" : {event} , "position" : 7 }} ] }}',
        '{{"events":[{{"position":null,"event":{event}}},{{"position":"p2"}},{{}}]}}',
    ],
)
def test_typed_and_generic_paths_give_the_same_rows(event, layout):
    body = layout.format(event=event, cart=CART).encode()
    assert rows(PARSER.parse_page(body, NOW)) == rows(PARSER._parse_page_generic(body, NOW))


def test_simulator_pages_give_the_same_rows_on_both_paths():
    journal = Journal(
        SimulatorOptions(
            malformed_share=0.05, duplicate_share=0.05, bare_share=0.1, unknown_trigger_share=0.1
        )
    )
    journal.publish(2000, 1.7e9, 0.5)
    for start in range(0, 2000, 500):
        chunks, last = journal.page(start, start + 500)
        body = (
            b'{"events":['
            + b"".join(bytes(chunk) for chunk in chunks)
            + b'],"_page":{"last":"'
            + last.encode()
            + b'"}}'
        )
        typed, generic = PARSER.parse_page(body, NOW), PARSER._parse_page_generic(body, NOW)
        assert rows(typed) == rows(generic)
        assert typed.quarantined and typed.ignored and typed.count == 500


def test_a_page_msgspec_refuses_is_read_by_the_generic_path():
    event = '{"event_id":"e","triggerId":"' + CART + '","timeGMT":NaN,"x":"\\ud800"}'
    body = '{"events":[{"position":"p","event":' + event + "}]}"
    page = PARSER.parse_page(body.encode(), NOW)
    assert page.values[3] == [CART] and page.last_position == "p"
    # a NaN time is quarantined; the lone surrogate is stored as U+FFFD
    assert page.values[6] == ["quarantined"] and page.values[7] == ["its time is not finite"]
    assert "\\ud800" not in page.values[9][0] and "\\ufffd" in page.values[9][0]
