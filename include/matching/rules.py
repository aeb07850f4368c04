"""The campaigns compiled into rules, and the candidates they make of a batch of events: pure pandas.

Steps 1 to 3 of a decision (SPEC sections 4, 5); ``decisions`` takes steps 4 to 6. For each event
in (time, event id) order, each campaign in the file's order:

1. trigger -> campaign (``"*"`` in ``pipeline.topics`` stands for every trigger);
2. ``where``: every condition holds (see ``values``);
3. identity: the LAST non-empty value of the campaign's eVar, or ``mcId``, to be joined with the
   configured ``recipients`` column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from include.config import WILDCARD, Campaign, TriggersConfig, dimension_column
from include.matching.values import last_value, objects, text_column, where_holds

MC_ID = "mc_id"  # the events column of the mcId field
CANDIDATE_COLUMNS = ("order", "rule", "campaign_id", "event_id", "time_gmt", "identity", "match_values")


@dataclass(frozen=True)
class Rule:
    """One campaign, compiled for the batch operations."""

    index: int
    campaign: Campaign
    trigger_ids: frozenset[str] | None  # None: every trigger
    source: str  # events column holding the identity: mc_id or dim_*
    column: str  # recipients column it is joined with
    hold: float  # seconds an event waits for its unless window
    unless_ids: frozenset[str] | None
    unless_label: str | None
    match_on: str | None  # dim_* column that ties the cancelling event to this one
    dedupe: float | None

    @property
    def id(self) -> str:
        return self.campaign.id


def _trigger_set(config: TriggersConfig, reference: str) -> frozenset[str] | None:
    ids = config.trigger_ids_for(reference)
    return None if WILDCARD in ids or reference == WILDCARD else frozenset(ids)


def compile_rules(config: TriggersConfig) -> list[Rule]:
    rules = []
    for index, campaign in enumerate(config.campaigns):
        identity = campaign.identity
        unless = campaign.unless
        rules.append(
            Rule(
                index=index,
                campaign=campaign,
                trigger_ids=_trigger_set(config, campaign.trigger),
                source=dimension_column(identity.dimension) if identity.dimension else MC_ID,
                column=identity.column,
                hold=unless.within if unless else 0.0,
                unless_ids=_trigger_set(config, unless.trigger) if unless else None,
                unless_label=unless.trigger if unless else None,
                match_on=dimension_column(unless.match_on) if unless and unless.match_on else None,
                dedupe=campaign.dedupe,
            )
        )
    return rules


def identity_sources(rules: Sequence[Rule]) -> list[tuple[str, str]]:
    """Every (events column, recipients column) pair a campaign joins on: how events name people."""
    return sorted({(rule.source, rule.column) for rule in rules})


def person_columns(rules: Sequence[Rule]) -> list[str]:
    return sorted({rule.column for rule in rules})


def hold_of(rules: Sequence[Rule], trigger_id: str) -> float:
    """How long a trigger's events wait: the longest ``unless`` of the campaigns it feeds."""
    default = max([rule.hold for rule in rules if rule.trigger_ids is None], default=0.0)
    per_trigger: dict[str, float] = {}
    for rule in rules:
        for rule_trigger in rule.trigger_ids or ():
            per_trigger[rule_trigger] = max(per_trigger.get(rule_trigger, default), rule.hold)
    return per_trigger.get(trigger_id, default)


def switched_off(rules: Sequence[Rule], trigger_id: str) -> bool:
    """Whether the trigger feeds campaigns and every one of them has ``enabled: false``: its events
    then wait undecided. A trigger that also feeds an enabled campaign is decided for all of them
    (the switched-off campaign's emails wait at delivery)."""
    feeding = [rule for rule in rules if rule.trigger_ids is None or trigger_id in rule.trigger_ids]
    return bool(feeding) and not any(rule.campaign.enabled for rule in feeding)


def latest_ready_time(now: float, hold: float) -> float:
    """The largest time t with ``t + hold <= now`` in floating point, as both databases add: a
    plain bound on the indexed column instead of an expression (exact at the window's end)."""
    bound = now - hold
    while bound + hold > now:
        bound = math.nextafter(bound, -math.inf)
    while (above := math.nextafter(bound, math.inf)) + hold <= now:
        bound = above
    return bound


def limit_window(config: TriggersConfig, rules: Sequence[Rule]) -> float:
    """How far apart in time two decisions can still limit each other (dedupe, frequency cap)."""
    cap = config.limits.per_recipient
    return max([rule.dedupe or 0.0 for rule in rules] + [cap.per if cap else 0.0])


# --- candidates -------------------------------------------------------------------------------


def in_decision_order(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` sorted by (time_gmt, event_id), as the database reads them; cheap when they are."""
    times = events["time_gmt"].to_numpy(dtype=float)
    steps = np.diff(times)
    if (steps >= 0).all():
        ties = np.flatnonzero(steps == 0)
        ids = events["event_id"].to_numpy(dtype=object)
        if all(ids[i] < ids[i + 1] for i in ties.tolist()):
            return events
    return events.sort_values(["time_gmt", "event_id"], kind="stable")


def expand_candidates(events: pd.DataFrame, rules: Sequence[Rule]) -> pd.DataFrame:
    """One row per (event, campaign) whose trigger and ``where`` match, with the identity value.

    ``events`` has event_id, trigger_id, time_gmt, mc_id and the dim_* columns. The rows come in
    decision order: event time, event id, then the campaign's place in the configuration.
    """
    events = in_decision_order(events).reset_index(drop=True)
    parts = []
    for rule in rules:
        if rule.trigger_ids is None:
            subset = events
        else:
            subset = events[events["trigger_id"].isin(rule.trigger_ids).to_numpy(dtype=bool)]
        if rule.campaign.where and len(subset):
            subset = subset[where_holds(subset, rule.campaign.where).to_numpy()]
        if len(subset):
            parts.append(_rule_candidates(rule, subset))
    if not parts:
        empty = {c: objects([]) for c in CANDIDATE_COLUMNS}
        empty.update(
            order=pd.Series(dtype=np.int64), rule=pd.Series(dtype=np.int64), time_gmt=pd.Series(dtype=float)
        )
        return pd.DataFrame(empty)
    candidates = pd.concat(parts, ignore_index=True)
    sequence = np.lexsort((candidates["rule"].to_numpy(), candidates["order"].to_numpy()))
    return candidates.take(sequence).reset_index(drop=True)


def _rule_candidates(rule: Rule, subset: pd.DataFrame) -> pd.DataFrame:
    """The candidates of one campaign: ``subset`` holds its matching events, indexed by order."""
    index = pd.RangeIndex(len(subset))
    source = subset[rule.source] if rule.source in subset else objects([""] * len(subset))
    match_values = subset[rule.match_on] if rule.match_on and rule.match_on in subset else None
    return pd.DataFrame(
        {
            "order": subset.index.to_numpy(),
            "rule": rule.index,
            "campaign_id": objects([rule.id] * len(subset), index),
            "event_id": objects(subset["event_id"].to_numpy(dtype=object), index),
            "time_gmt": subset["time_gmt"].to_numpy(dtype=float),
            "identity": objects(last_value(source).to_numpy(dtype=object), index),
            "match_values": (
                objects(text_column(match_values).to_numpy(dtype=object), index)
                if match_values is not None
                else objects([""] * len(subset), index)
            ),
        },
        index=index,
    )
