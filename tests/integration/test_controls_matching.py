"""A switched-off campaign in matching (SPEC section 9), on SQLite and PostgreSQL: the events of a
trigger that feeds only switched-off campaigns wait undecided (status new, frontier kept) and are
decided once it is back on; a trigger shared with an enabled campaign is decided for both, the
switched-off campaign's emails waiting at delivery."""

from __future__ import annotations

from sqlalchemy import Engine

from include.config import TriggersConfig, parse_config
from include.matching.run import match_ready_events
from tests.integration.test_matching_db import (
    CONFIG,
    CONFIG_TEXT,
    HOUR,
    T0,
    audience,
    deliveries_of,
    frontier_of,
    stage,
    statuses,
)


def browse_off(config_text: str = CONFIG_TEXT) -> TriggersConfig:
    return parse_config(
        config_text.replace("    trigger: browse\n", "    trigger: browse\n    enabled: false\n")
    )


def test_events_of_a_switched_off_campaign_wait_undecided_until_it_is_back_on(engine: Engine) -> None:
    audience(engine)
    stage(
        engine,
        {"id": "c1", "kind": "cart", "shopper": "S1", "products": ["A"], "t": T0},
        {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0},
        {"id": "b2", "kind": "browse", "mc": "MC2", "t": T0 + 60},
    )
    counts = match_ready_events(engine, browse_off(), now=T0 + HOUR)
    assert counts["ready"] == 1  # the cart only
    assert statuses(engine) == {"c1": "matched", "b1": "new", "b2": "new"}
    assert frontier_of(engine)["T-BROWSE"][0] == T0  # kept: a later run reads them again
    assert deliveries_of(engine)["campaign_id"].tolist() == ["cart_abandonment"]
    # a day later, still off: still waiting; then on again: decided
    match_ready_events(engine, browse_off(), now=T0 + 24 * HOUR)
    assert statuses(engine)["b1"] == "new"
    counts = match_ready_events(engine, CONFIG, now=T0 + 25 * HOUR)
    assert counts["ready"] == 2 and statuses(engine) == {"c1": "matched", "b1": "matched", "b2": "matched"}
    decided = deliveries_of(engine)
    assert sorted(decided.loc[decided["campaign_id"] == "browse_abandonment", "recipient_id"]) == ["r1", "r2"]


def test_a_trigger_shared_with_an_enabled_campaign_is_decided_for_both(engine: Engine) -> None:
    shared = CONFIG_TEXT.replace(
        "limits:\n",
        "  - id: browse_followup\n    trigger: browse\n    enabled: false\n"
        "    identity: {field: mcId, column: mc_id}\n    template: browse_abandonment\n"
        '    sender: "Shop <shop@example.com>"\n'
        "limits:\n",
    )
    config = parse_config(shared)
    audience(engine)
    stage(engine, {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0})
    match_ready_events(engine, config, now=T0 + HOUR)
    assert statuses(engine) == {"b1": "matched"}
    decided = deliveries_of(engine).set_index("campaign_id")
    # both decided; the switched-off one's email is pending and waits at delivery
    assert set(decided.index) == {"browse_abandonment", "browse_followup"}
    assert decided.loc["browse_followup", "status"] == "pending"
