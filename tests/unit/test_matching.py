"""Matching rules on small frames (SPEC sections 4, 5, 7): every rule, every op, and their edges."""

from __future__ import annotations

import copy
import re
from typing import Any

import pandas as pd
import pytest
import yaml

from include.config import VALUE_SEPARATOR as SEP
from include.config import TriggersConfig, dimension_column, parse_config
from include.matching.decisions import decide, delivery_ids, limit_reasons
from include.matching.rules import compile_rules, expand_candidates
from include.matching.values import condition_holds, last_value

TRIGGER_IDS = {"cart": "T-CART", "browse": "T-BROWSE", "purchase": "T-BUY", "other": "T-OTHER"}
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
T0 = 1_767_225_600.0

BASE: dict[str, Any] = {
    "pipeline": {
        "consumer": "test",
        "topics": [
            {
                "name": "triggers",
                "triggers": [
                    {"name": "T-CART", "label": "cart"},
                    {"name": "T-BROWSE", "label": "browse"},
                    {"name": "T-BUY", "label": "purchase"},
                    {"name": "T-OTHER", "label": "other"},
                ],
            }
        ],
    },
    "campaigns": [
        {
            "id": "cart_abandonment",
            "trigger": "cart",
            "identity": {"dimension": "eVar01", "column": "shopper_id"},
            "unless": {"trigger": "purchase", "within": "30m"},
            "template": "cart_abandonment",
            "sender": "Shop <shop@example.com>",
        },
        {
            "id": "browse_abandonment",
            "trigger": "browse",
            "identity": {"field": "mcId", "column": "mc_id"},
            "template": "browse_abandonment",
            "sender": "Shop <shop@example.com>",
        },
    ],
}


def make_config(change: Any = None) -> TriggersConfig:
    """The base configuration, edited by ``change(data)``."""
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    return parse_config(yaml.safe_dump(data))


def events_frame(config: TriggersConfig, *rows: dict[str, Any]) -> pd.DataFrame:
    """Staged events as matching reads them; dimension values given as lists are joined."""
    columns = [
        "event_id",
        "trigger_id",
        "time_gmt",
        "mc_id",
        *(dimension_column(d) for d in config.dimensions),
    ]
    records = []
    for number, row in enumerate(rows):
        record: dict[str, Any] = {
            "event_id": row.get("id", f"e{number:03d}"),
            "trigger_id": TRIGGER_IDS.get(row["trigger"], row["trigger"]),
            "time_gmt": float(row.get("t", T0 + number)),
            "mc_id": row.get("mc"),
        }
        for dimension in config.dimensions:
            value = row.get(dimension)
            record[dimension_column(dimension)] = SEP.join(value) if isinstance(value, list) else value
        records.append(record)
    return pd.DataFrame(records, columns=columns)


def recipients_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    defaults = {"email": None, "opted_out": False, "shopper_id": None, "mc_id": None}
    frame = pd.DataFrame(
        [{**defaults, **row} for row in rows],
        columns=["recipient_id", "email", "opted_out", "shopper_id", "mc_id"],
    )
    return frame


PEOPLE = recipients_frame(
    {"recipient_id": "r1", "email": "ann@example.com", "shopper_id": "S1", "mc_id": "MC1"},
    {"recipient_id": "r2", "email": "bob@example.com", "shopper_id": "S2", "mc_id": "MC2"},
    {"recipient_id": "r3", "email": "cid@example.com", "shopper_id": "S3", "mc_id": "MC3", "opted_out": True},
    {"recipient_id": "r4", "email": "not an address", "shopper_id": "S4", "mc_id": "MC4"},
    {"recipient_id": "r5", "email": None, "shopper_id": "S5"},
)
NO_HISTORY = pd.DataFrame(
    {"recipient_id": [], "campaign_id": [], "event_time": pd.Series([], dtype=float), "event_id": []}
)


def run(
    config: TriggersConfig,
    events: pd.DataFrame,
    people: pd.DataFrame = PEOPLE,
    history: pd.DataFrame = NO_HISTORY,
) -> pd.DataFrame:
    return decide(events, people, events, history, config)


def outcome(decisions: pd.DataFrame) -> list[tuple[str, str, str | None]]:
    """(event, campaign, reason or 'pending') in decision order."""
    return [
        (e, c, r if isinstance(r, str) else "pending")
        for e, c, r in zip(decisions["event_id"], decisions["campaign_id"], decisions["reason"], strict=True)
    ]


# --- trigger -> campaign, identity ---------------------------------------------------------


def test_each_event_goes_to_the_campaigns_of_its_trigger_and_others_match_nothing() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "c", "trigger": "cart", "eVar01": "S1"},
        {"id": "b", "trigger": "browse", "mc": "MC2"},
        {"id": "p", "trigger": "purchase", "eVar01": "S2"},
        {"id": "o", "trigger": "other", "mc": "MC1"},
    )
    assert outcome(run(config, events)) == [
        ("c", "cart_abandonment", "pending"),
        ("b", "browse_abandonment", "pending"),
    ]


def test_a_campaign_may_name_the_trigger_id_instead_of_its_label() -> None:
    config = make_config(lambda d: d["campaigns"][1].update(trigger="T-BROWSE"))
    events = events_frame(config, {"id": "b", "trigger": "browse", "mc": "MC2"})
    assert outcome(run(config, events)) == [("b", "browse_abandonment", "pending")]


def test_the_wildcard_trigger_feeds_a_campaign_every_trigger() -> None:
    def wildcard(data: dict[str, Any]) -> None:
        data["pipeline"]["topics"][0]["triggers"].append({"name": "*", "label": "anything"})
        data["campaigns"].append(
            {
                "id": "all",
                "trigger": "anything",
                "identity": {"field": "mcId", "column": "mc_id"},
                "template": "t",
                "sender": "s@example.com",
            }
        )

    config = make_config(wildcard)
    assert compile_rules(config)[2].trigger_ids is None
    events = events_frame(
        config,
        {"id": "x", "trigger": "T-NEVER-SEEN", "mc": "MC1"},
        {"id": "b", "trigger": "browse", "mc": "MC2"},
    )
    assert outcome(run(config, events)) == [
        ("x", "all", "pending"),
        ("b", "browse_abandonment", "pending"),
        ("b", "all", "pending"),
    ]


def test_identity_by_evar_takes_the_last_non_empty_value_and_by_mcid_the_field() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "c", "trigger": "cart", "eVar01": ["S9", "S2", "", " "], "mc": "MC1"},
        {"id": "b", "trigger": "browse", "mc": "MC1", "eVar01": "S2"},
    )
    decisions = run(config, events)
    assert decisions["recipient_id"].tolist() == ["r2", "r1"]
    assert decisions["email"].tolist() == ["bob@example.com", "ann@example.com"]


def test_last_value_edges() -> None:
    values = pd.Series([None, "", "a", f"a{SEP}b", f"a{SEP}b{SEP}", f"a{SEP}{SEP}", f" x {SEP} "])
    assert last_value(values).tolist() == ["", "", "a", "b", "b", "a", "x"]


# --- where: every op ------------------------------------------------------------------------


def cond(op: str, value: Any = None) -> Any:
    config = make_config(
        lambda d: d["campaigns"][0].update(where=[{"dimension": "pageName", "op": op, "value": value}])
    )
    return config.campaigns[0].where[0]


VALUES = pd.Series(["checkout:cart", "home", f"home{SEP}checkout:pay", "", None, "12", f"3{SEP}40", "1e2"])


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("eq", "home", [False, True, True, False, False, False, False, False]),
        ("ne", "home", [True, False, False, True, True, True, True, True]),  # no value equals
        ("in", ["home", "12"], [False, True, True, False, False, True, False, False]),
        ("startswith", "checkout", [True, False, True, False, False, False, False, False]),
        ("contains", "out:", [True, False, True, False, False, False, False, False]),
        ("exists", None, [True, True, True, False, False, True, True, True]),
        ("gt", 12, [False, False, False, False, False, False, True, True]),
        ("ge", "12", [False, False, False, False, False, True, True, True]),
        ("lt", 12, [False, False, False, False, False, False, True, False]),
        ("le", 12.0, [False, False, False, False, False, True, True, False]),
    ],
)
def test_every_op_holds_when_any_value_satisfies_it(op: str, value: Any, expected: list[bool]) -> None:
    assert condition_holds(VALUES, cond(op, value)).tolist() == expected


def test_eq_compares_text_so_a_yaml_number_matches_its_digits() -> None:
    assert condition_holds(pd.Series(["12", "12.0"]), cond("eq", 12)).tolist() == [True, False]


def test_all_where_conditions_must_hold_and_a_missing_dimension_has_no_value() -> None:
    def where(data: dict[str, Any]) -> None:
        data["campaigns"][0]["where"] = [
            {"dimension": "pageName", "op": "startswith", "value": "checkout"},
            {"dimension": "products", "op": "exists"},
        ]

    config = make_config(where)
    events = events_frame(
        config,
        {"id": "both", "trigger": "cart", "eVar01": "S1", "pageName": "checkout", "products": ["", "SKU-1"]},
        {"id": "page-only", "trigger": "cart", "eVar01": "S1", "pageName": "checkout"},
        {"id": "wrong-page", "trigger": "cart", "eVar01": "S2", "pageName": "home", "products": "SKU-1"},
    )
    assert outcome(run(config, events)) == [("both", "cart_abandonment", "pending")]


# --- audience ---------------------------------------------------------------------------------


def test_audience_reasons_unknown_opted_out_invalid_and_missing_email_and_no_identity() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "unknown", "trigger": "cart", "eVar01": "S404"},
        {"id": "opted", "trigger": "cart", "eVar01": "S3"},
        {"id": "invalid", "trigger": "cart", "eVar01": "S4"},
        {"id": "no-email", "trigger": "cart", "eVar01": "S5"},
        {"id": "no-identity", "trigger": "cart", "eVar01": ["", ""]},
        {"id": "fine", "trigger": "cart", "eVar01": "S1"},
    )
    decisions = run(config, events)
    assert outcome(decisions) == [
        ("unknown", "cart_abandonment", "unknown_recipient"),
        ("opted", "cart_abandonment", "opted_out"),
        ("invalid", "cart_abandonment", "invalid_email"),
        ("no-email", "cart_abandonment", "no_email"),
        ("no-identity", "cart_abandonment", "missing_identity"),
        ("fine", "cart_abandonment", "pending"),
    ]
    assert decisions["status"].tolist() == ["suppressed"] * 5 + ["pending"]
    assert decisions["recipient_id"].tolist()[:4] == [None, "r3", "r4", "r5"]


# --- unless -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("purchase_after", "cancelled"),
    [(-1.0, False), (0.0, True), (10 * MINUTE, True), (30 * MINUTE, True), (30 * MINUTE + 0.001, False)],
)
def test_unless_cancels_inside_the_window_both_ends_included(purchase_after: float, cancelled: bool) -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "cart", "trigger": "cart", "eVar01": "S1", "t": T0},
        {"id": "buy", "trigger": "purchase", "eVar01": "S1", "t": T0 + purchase_after},
    )
    expected = "cancelled_by:purchase" if cancelled else "pending"
    assert outcome(run(config, events)) == [("cart", "cart_abandonment", expected)]


def test_unless_needs_the_same_person_and_the_cancelling_trigger() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "cart", "trigger": "cart", "eVar01": "S1"},
        {"id": "other-person", "trigger": "purchase", "eVar01": "S2"},
        {"id": "other-trigger", "trigger": "browse", "eVar01": "S1", "mc": "MC9"},
    )
    assert outcome(run(config, events))[0] == ("cart", "cart_abandonment", "pending")


def test_unless_recognises_a_person_with_two_identities() -> None:
    """The cart names the shopper id; the purchase only the mcId of the same recipient."""
    config = make_config()
    events = events_frame(
        config,
        {"id": "cart", "trigger": "cart", "eVar01": "S1", "t": T0},
        {"id": "buy", "trigger": "purchase", "mc": "MC1", "t": T0 + MINUTE},
    )
    assert outcome(run(config, events)) == [("cart", "cart_abandonment", "cancelled_by:purchase")]


def test_unless_match_on_needs_a_shared_value_of_that_dimension() -> None:
    config = make_config(lambda d: d["campaigns"][0]["unless"].update(match_on="products"))
    events = events_frame(
        config,
        {"id": "cart-a", "trigger": "cart", "eVar01": "S1", "products": ["SKU-1", "SKU-2"], "t": T0},
        {"id": "cart-b", "trigger": "cart", "eVar01": "S2", "products": "SKU-7", "t": T0},
        {"id": "cart-c", "trigger": "cart", "eVar01": "S1", "t": T0 + 1},
        {
            "id": "buy-1",
            "trigger": "purchase",
            "eVar01": "S1",
            "products": ["SKU-9", "SKU-2"],
            "t": T0 + MINUTE,
        },
        {"id": "buy-2", "trigger": "purchase", "eVar01": "S2", "products": "SKU-8", "t": T0 + MINUTE},
    )
    assert outcome(run(config, events)) == [
        ("cart-a", "cart_abandonment", "cancelled_by:purchase"),  # SKU-2 in common
        ("cart-b", "cart_abandonment", "pending"),  # bought something else
        ("cart-c", "cart_abandonment", "pending"),  # no products: nothing to tie the purchase to
    ]


def test_an_event_never_cancels_itself_when_a_campaign_is_cancelled_by_its_own_trigger() -> None:
    config = make_config(lambda d: d["campaigns"][0]["unless"].update(trigger="cart"))
    events = events_frame(
        config,
        {"id": "first", "trigger": "cart", "eVar01": "S1", "t": T0},
        {"id": "again", "trigger": "cart", "eVar01": "S1", "t": T0 + 5 * MINUTE},
    )
    assert outcome(run(config, events)) == [
        ("first", "cart_abandonment", "cancelled_by:cart"),
        ("again", "cart_abandonment", "pending"),
    ]


# --- dedupe and the frequency cap ------------------------------------------------------------


def with_dedupe(data: dict[str, Any]) -> None:
    data["campaigns"][1]["dedupe"] = "24h"


def test_dedupe_keeps_the_earliest_and_counts_only_kept_decisions() -> None:
    config = make_config(with_dedupe)
    events = events_frame(
        config,
        {"id": "a", "trigger": "browse", "mc": "MC1", "t": T0},
        {"id": "b", "trigger": "browse", "mc": "MC1", "t": T0 + 0.6 * DAY},
        {"id": "c", "trigger": "browse", "mc": "MC1", "t": T0 + 1.2 * DAY},  # 1.2 d after the kept one
        {"id": "d", "trigger": "browse", "mc": "MC2", "t": T0 + 0.1 * DAY},  # someone else
    )
    assert outcome(run(config, events)) == [
        ("a", "browse_abandonment", "pending"),
        ("d", "browse_abandonment", "pending"),
        ("b", "browse_abandonment", "dedupe"),
        ("c", "browse_abandonment", "pending"),
    ]


def test_dedupe_window_edge_exactly_the_window_apart_is_allowed() -> None:
    config = make_config(with_dedupe)
    events = events_frame(
        config,
        {"id": "a", "trigger": "browse", "mc": "MC1", "t": T0},
        {"id": "b", "trigger": "browse", "mc": "MC1", "t": T0 + DAY},
        {"id": "c", "trigger": "browse", "mc": "MC1", "t": T0 + 2 * DAY - 0.001},
    )
    assert [r for *_, r in outcome(run(config, events))] == ["pending", "pending", "dedupe"]


def test_dedupe_counts_decisions_already_made() -> None:
    config = make_config(with_dedupe)
    events = events_frame(config, {"id": "now", "trigger": "browse", "mc": "MC1", "t": T0})
    history = pd.DataFrame(
        {
            "recipient_id": ["r1"],
            "campaign_id": ["browse_abandonment"],
            "event_time": [T0 - 23 * HOUR],
            "event_id": ["old"],
        }
    )
    assert outcome(run(config, events, history=history)) == [("now", "browse_abandonment", "dedupe")]
    other_campaign = history.assign(campaign_id="cart_abandonment")
    assert outcome(run(config, events, history=other_campaign)) == [("now", "browse_abandonment", "pending")]


def test_suppressed_decisions_do_not_count_for_dedupe() -> None:
    config = make_config(with_dedupe)
    events = events_frame(
        config,
        {"id": "bought", "trigger": "cart", "eVar01": "S1", "t": T0},
        {"id": "buy", "trigger": "purchase", "eVar01": "S1", "t": T0 + MINUTE},
        {"id": "later", "trigger": "cart", "eVar01": "S1", "t": T0 + HOUR},
    )
    config = make_config(lambda d: d["campaigns"][0].update(dedupe="24h"))
    assert [r for *_, r in outcome(run(config, events))] == ["cancelled_by:purchase", "pending"]


def capped(maximum: int, per: str = "24h") -> Any:
    def change(data: dict[str, Any]) -> None:
        data["limits"] = {"per_recipient": {"max": maximum, "per": per}}

    return change


def test_frequency_cap_across_campaigns_earliest_first_one_person_two_identities() -> None:
    config = make_config(capped(2))
    events = events_frame(
        config,
        {"id": "1", "trigger": "browse", "mc": "MC1", "t": T0},
        {"id": "2", "trigger": "cart", "eVar01": "S1", "t": T0 + HOUR},  # same person by shopper id
        {"id": "3", "trigger": "browse", "mc": "MC1", "t": T0 + 2 * HOUR},
        {"id": "4", "trigger": "browse", "mc": "MC2", "t": T0 + 3 * HOUR},
        {"id": "5", "trigger": "cart", "eVar01": "S1", "t": T0 + DAY},  # the first one left the window
        {"id": "6", "trigger": "cart", "eVar01": "S1", "t": T0 + DAY + 30 * MINUTE},  # 2 and 5 inside
    )
    assert [r for *_, r in outcome(run(config, events))] == [
        "pending",
        "pending",
        "frequency_cap",
        "pending",
        "pending",
        "frequency_cap",
    ]


def test_frequency_cap_counts_decisions_already_made_on_both_sides() -> None:
    config = make_config(capped(1, "1h"))
    events = events_frame(config, {"id": "now", "trigger": "browse", "mc": "MC1", "t": T0})
    for offset, expected in [
        (-59 * MINUTE, "frequency_cap"),
        (59 * MINUTE, "frequency_cap"),
        (-HOUR, "pending"),
    ]:
        history = pd.DataFrame(
            {
                "recipient_id": ["r1"],
                "campaign_id": ["cart_abandonment"],
                "event_time": [T0 + offset],
                "event_id": ["x"],
            }
        )
        assert outcome(run(config, events, history=history))[0][2] == expected, offset


def test_limit_reasons_scan_with_history_and_several_candidates() -> None:
    config = make_config(lambda d: (with_dedupe(d), capped(2, "10h")(d)))
    rules = compile_rules(config)
    candidates = pd.DataFrame(
        {
            "recipient_id": ["r1", "r1", "r1", "r2"],
            "campaign_id": ["browse_abandonment", "cart_abandonment", "cart_abandonment", "cart_abandonment"],
            "time_gmt": [T0, T0 + 1, T0 + 2, T0 + 3],
        }
    )
    history = pd.DataFrame(
        {"recipient_id": ["r1"], "campaign_id": ["cart_abandonment"], "event_time": [T0 - HOUR]}
    )
    reasons = limit_reasons(candidates, history, rules, (2, 10 * HOUR))
    assert reasons.tolist() == [None, "frequency_cap", "frequency_cap", None]


# --- the whole decision ----------------------------------------------------------------------


def test_an_empty_batch_decides_nothing() -> None:
    config = make_config()
    events = events_frame(config)
    decisions = run(config, events)
    assert decisions.empty
    assert list(decisions.columns) == [
        "campaign_id",
        "recipient_id",
        "email",
        "event_id",
        "event_time",
        "status",
        "reason",
    ]
    assert expand_candidates(events, compile_rules(config)).empty


def test_delivery_ids_are_stable_and_distinct() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "c", "trigger": "cart", "eVar01": "S1"},
        {"id": "u", "trigger": "cart", "eVar01": "S404"},
        {"id": "b", "trigger": "browse", "mc": "MC1"},
    )
    first, second = run(config, events), run(config, events.iloc[::-1])
    ids = delivery_ids(first["campaign_id"], first["recipient_id"], first["event_id"])
    assert ids == delivery_ids(second["campaign_id"], second["recipient_id"], second["event_id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", delivery_id) for delivery_id in ids)
    assert len(set(ids)) == 3  # the unknown recipient's decision too
    again = delivery_ids(pd.Series(["cart_abandonment"]), pd.Series(["r1"]), pd.Series(["c"]))
    assert again == [ids[0]]


def test_decisions_come_in_time_then_event_id_order_whatever_the_input_order() -> None:
    config = make_config()
    events = events_frame(
        config,
        {"id": "z", "trigger": "browse", "mc": "MC1", "t": T0},
        {"id": "a", "trigger": "browse", "mc": "MC2", "t": T0},
        {"id": "m", "trigger": "browse", "mc": "MC2", "t": T0 - 1},
    )
    assert run(config, events)["event_id"].tolist() == ["m", "a", "z"]
