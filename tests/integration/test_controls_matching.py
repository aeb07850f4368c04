"""A switched-off campaign in matching (SPEC section 9), on SQLite and PostgreSQL: the events of a
trigger that feeds only switched-off campaigns wait undecided (status new, frontier kept) and are
decided once it is back on; a trigger shared with an enabled campaign is decided for both, the
switched-off campaign's emails waiting at delivery."""

from __future__ import annotations

from sqlalchemy import Engine, text

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


def capped_at_one(config_text: str = CONFIG_TEXT) -> str:
    return config_text.replace("per_recipient: {max: 3, per: 24h}", "per_recipient: {max: 1, per: 24h}")


def test_a_switched_off_campaigns_waiting_email_caps_no_enabled_campaign(engine: Engine) -> None:
    """Ann's browse email was decided while browse was on; browse is switched off before it is
    sent. Her cart email an hour later is not capped by that waiting email (at one a day), but
    would be by a browse email actually sent, or while browse is on."""
    audience(engine)
    stage(engine, {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0})
    match_ready_events(engine, parse_config(capped_at_one()), now=T0 + HOUR)
    assert deliveries_of(engine)["status"].tolist() == ["pending"]
    stage(engine, {"id": "c1", "kind": "cart", "shopper": "S1", "products": ["A"], "t": T0 + HOUR})

    def cart_decision(config: TriggersConfig) -> str:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM deliveries WHERE event_id = 'c1'"))
            conn.execute(text("UPDATE pipeline_events SET status = 'new' WHERE event_id = 'c1'"))
        match_ready_events(engine, config, now=T0 + 3 * HOUR)
        cart = deliveries_of(engine).query("event_id == 'c1'")
        return str(cart["reason"].fillna(cart["status"]).iloc[0])

    assert cart_decision(browse_off(capped_at_one())) == "pending"
    assert cart_decision(parse_config(capped_at_one())) == "frequency_cap"  # browse on: it counts
    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'sent' WHERE event_id = 'b1'"))
    assert cart_decision(browse_off(capped_at_one())) == "frequency_cap"  # sent: it counts


def test_in_one_run_a_waiting_email_counts_for_its_own_dedupe_only(engine: Engine) -> None:
    """A switched-off campaign listed first on a shared trigger: its emails wait and cap no
    enabled campaign, within a batch and across batches, yet a second one for the same person
    within its dedupe window is still dedupe (no pile of them goes out when it is back on)."""
    early = capped_at_one().replace(
        "campaigns:\n",
        "campaigns:\n  - id: browse_early\n    trigger: browse\n    enabled: false\n    dedupe: 24h\n"
        "    identity: {field: mcId, column: mc_id}\n    template: browse_abandonment\n"
        '    sender: "Shop <shop@example.com>"\n',
    )
    audience(engine)
    stage(
        engine,
        {"id": "b1", "kind": "browse", "mc": "MC1", "t": T0},
        {"id": "b2", "kind": "browse", "mc": "MC1", "t": T0 + 60},
        {"id": "b3", "kind": "browse", "mc": "MC1", "t": T0 + 120},
    )
    match_ready_events(engine, parse_config(early), now=T0 + HOUR, batch_size=2)
    decided = deliveries_of(engine)
    outcome = {
        (row.event_id, row.campaign_id): row.reason if isinstance(row.reason, str) else row.status
        for row in decided.itertuples()
    }
    assert outcome == {
        ("b1", "browse_early"): "pending",
        ("b1", "browse_abandonment"): "pending",  # the waiting email before it caps nothing
        ("b2", "browse_early"): "dedupe",
        ("b2", "browse_abandonment"): "dedupe",
        ("b3", "browse_early"): "dedupe",  # in the next batch: from the run's own decisions
        ("b3", "browse_abandonment"): "dedupe",
    }
    stage(engine, {"id": "b4", "kind": "browse", "mc": "MC1", "t": T0 + 180})
    match_ready_events(engine, parse_config(early), now=T0 + 2 * HOUR)  # a later run: read back
    later = deliveries_of(engine).query("event_id == 'b4'").set_index("campaign_id")["reason"]
    assert later.to_dict() == {"browse_early": "dedupe", "browse_abandonment": "dedupe"}
