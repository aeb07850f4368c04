"""Matching: staged trigger events -> campaign decisions in ``deliveries`` (SPEC sections 4, 5, 7).

Each rule is a vectorised pandas step over a batch of events read in time order:

1. trigger -> campaign (``"*"`` in ``pipeline.topics`` stands for every trigger);
2. ``where``: every condition must hold; a condition holds when ANY value of the dimension
   satisfies it (``ne``: no value equals; ``exists``: a non-empty value); gt/ge/lt/le compare
   numerically;
3. identity: the LAST non-empty value of the campaign's eVar, or ``mcId``, joined with the
   configured ``recipients`` column; the PERSON is the recipient found, so one person reached
   through a shopper id and through an mcId is one person everywhere below;
4. audience: ``missing_identity``, ``unknown_recipient``, ``opted_out``, ``no_email``,
   ``invalid_email``;
5. ``unless``: a decision is taken only once its window has closed (``time_gmt + within <=
   now``); it is ``cancelled_by:<trigger>`` when the same person fired the cancelling trigger
   at a time in ``[t, t + within]`` (both edges inclusive), among all staged events whatever
   their status; with ``match_on`` the two events must share a value of that dimension;
6. ``dedupe`` and ``limits.per_recipient``, earliest events first (time, then event id, then
   the campaign's order in the file): a decision is suppressed as ``dedupe`` when the person
   has another live decision of the campaign less than ``dedupe`` apart, as ``frequency_cap``
   when ``max`` live decisions of any campaign lie less than ``per`` apart from it. Live means
   pending, sending or sent, in this batch or already in ``deliveries``.

The first reason in that order wins. Decisions are written with ``ON CONFLICT DO NOTHING`` under
a stable ``delivery_id`` (campaign, recipient, event), in the same transaction that marks their
events ``matched`` (a delivery row, pending or suppressed) or ``unmatched``.

Determinism: events are decided in (time, event id) order and every earlier decision is read
back from ``deliveries`` (a run keeps its own in memory: a batch is committed by a writer
process while the next one is decided), so one run over a set of closed events and any
sequence of runs that sees them in time order (backfill intervals in order; scheduled runs when
the matched triggers share one ``unless`` window) write the same rows. When campaigns hold their events for different
windows, a later event of a shorter-held campaign can be decided first; the window checks then
also count that later decision, so the dedupe and frequency guarantees still hold (the earlier
event is the one suppressed).

Finding ready events: no index holds the status, so marking an event rewrites only its row.
``matching_frontier`` keeps per trigger a time before which none of its journal events is still
new: a database trigger lowers it (and raises its version) whenever new events are inserted; a
run that decided every ready event moves it up to where the trigger's hold ends, unless its
version moved meanwhile (an older event may have been staged unseen). A run reads one index
range per trigger from there, merged in time order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, text

from include.config import WILDCARD, Campaign, Condition, TriggersConfig, dimension_column
from include.database.schema import VALUE_SEPARATOR, deliveries
from include.database.sql import bulk_write, driver_sql, in_list, list_param
from include.runtime import collector_paused, spawn_pool
from include.staging.parser import IMPORTED_POSITION

LIVE_STATUSES = ("pending", "sending", "sent")
STAGED_STATUSES = ("new", "matched", "unmatched")  # events that can cancel (not quarantined/ignored)
DELIVERY_COLUMNS = (
    "delivery_id", "campaign_id", "recipient_id", "email", "event_id", "event_time",
    "decided_at", "status", "reason", "attempts",
)
MC_ID = "mc_id"  # the events column of the mcId field
HISTORY_COLUMNS = ["recipient_id", "campaign_id", "event_time", "event_id"]  # live decisions, as dedupe reads them
log = logging.getLogger(__name__)


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


def delivery_ids(campaign_ids: pd.Series, recipient_ids: pd.Series, event_ids: pd.Series) -> list[str]:
    """The stable id of a decision: sha256 of campaign, recipient and event, 32 hex digits."""
    sha256 = hashlib.sha256
    return [
        sha256(f"{c}\x1f{r}\x1f{e}".encode()).hexdigest()[:32]
        for c, r, e in zip(campaign_ids.tolist(), _none_to_empty(recipient_ids), event_ids.tolist(), strict=True)
    ]


def _none_to_empty(values: pd.Series) -> list[str]:
    return ["" if v is None or v != v else v for v in values.tolist()]  # v != v: NaN


def _objects(values: Any, index: pd.Index | None = None) -> pd.Series:
    """Strings as an object Series: no per-element check that pandas' str dtype would run."""
    return pd.Series(np.asarray(values, dtype=object), index=index, dtype=object, copy=False)


def _text(values: pd.Series) -> pd.Series:
    """A text column with missing values as ''."""
    return _objects(values.fillna("").to_numpy(dtype=object), values.index)


# --- dimension values -----------------------------------------------------------------------


def _each(function: Callable[[str], Any], values: pd.Series) -> list[Any]:
    """``function`` of each text: a comprehension is ~10x pandas' ``.str`` on object columns."""
    return [function(value) for value in values.tolist()]


def _last_of(value: str) -> str:
    if VALUE_SEPARATOR not in value:
        return value.strip()
    return next((part.strip() for part in reversed(value.split(VALUE_SEPARATOR)) if part.strip()), "")


def last_value(values: pd.Series) -> pd.Series:
    """The identity in a dimension column: its last non-empty value, stripped; '' when none."""
    values = _text(values)
    # most values are single: no call for them
    return _objects([_last_of(v) if VALUE_SEPARATOR in v else v.strip() for v in values.tolist()], values.index)


def _exploded(values: pd.Series) -> pd.Series:
    """One row per value, indexed like the rows they come from."""
    return _text(values).str.split(VALUE_SEPARATOR).explode()


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _value_test(values: pd.Series, condition: Condition) -> np.ndarray:
    """Per single value: does it satisfy the condition (for ``ne``: does it equal the value)."""
    op, target = condition.op, condition.value
    if op == "exists":
        return np.array(_each(str.strip, values), dtype=bool)
    elif op in ("eq", "ne"):
        result = values == _as_text(target)
    elif op == "in":
        result = values.isin([_as_text(v) for v in target])
    elif op == "startswith":
        prefix = _as_text(target)
        return np.array(_each(lambda value: value.startswith(prefix), values), dtype=bool)
    elif op == "contains":
        part = _as_text(target)
        return np.array(_each(lambda value: part in value, values), dtype=bool)
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        bound = float(target)
        with np.errstate(invalid="ignore"):
            return {"gt": numbers > bound, "ge": numbers >= bound, "lt": numbers < bound, "le": numbers <= bound}[op]
    return np.array(result.fillna(False), dtype=bool)


def condition_holds(values: pd.Series, condition: Condition) -> pd.Series:
    """Whether a ``where`` condition holds for each row of a dimension column (any value)."""
    values = _text(values)
    multi = np.array(_each(lambda value: VALUE_SEPARATOR in value, values), dtype=bool)
    any_value = _value_test(values, condition)
    if multi.any():
        exploded = _exploded(values[multi])
        hits = pd.Series(_value_test(exploded, condition), index=exploded.index).groupby(level=0).any()
        any_value[multi] = hits.reindex(values.index[multi], fill_value=False).to_numpy(dtype=bool)
    return pd.Series(~any_value if condition.op == "ne" else any_value, index=values.index)


def where_holds(events: pd.DataFrame, conditions: Iterable[Condition]) -> pd.Series:
    """Whether every condition holds, per event; a missing dimension has no value."""
    mask = np.ones(len(events), dtype=bool)
    for condition in conditions:
        column = dimension_column(condition.dimension)
        values = events[column] if column in events else _objects([""] * len(events), events.index)
        mask &= condition_holds(values, condition).to_numpy(dtype=bool)
    return pd.Series(mask, index=events.index)


# --- the pure steps over frames -------------------------------------------------------------


def in_decision_order(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` sorted by (time_gmt, event_id), as the database reads them; cheap when they are."""
    times = events["time_gmt"].to_numpy(dtype=float)
    steps = np.diff(times)
    if (steps >= 0).all():
        ties = np.flatnonzero(steps == 0)
        ids = events["event_id"].to_numpy(dtype=object)
        if all(ids[i] < ids[i + 1] for i in ties.tolist()):
            return events
    return events.sortvalues(["time_gmt", "event_id"], kind="stable")


CANDIDATE_COLUMNS = ("order", "rule", "campaign_id", "event_id", "time_gmt", "identity", "match_values")


def expand_candidates(events: pd.DataFrame, rules: Sequence[Rule]) -> pd.DataFrame:
    """One row per (event, campaign) whose trigger and ``where`` match, with the identity value.

    ``events`` has event_id, trigger_id, time_gmt, mc_id and the dim_* columns. The rows come in
    decision order: event time, event id, then the campaign's place in the configuration.
    """
    events = in_decision_order(events).reset_index(drop=True)
    parts = []
    for rule in rules:
        subset = events if rule.trigger_ids is None else events[events["trigger_id"].isin(rule.trigger_ids).to_numpy(dtype=bool)]
        if rule.campaign.where and len(subset):
            subset = subset[where_holds(subset, rule.campaign.where).to_numpy()]
        if not len(subset):
            continue
        index = pd.RangeIndex(len(subset))
        source = subset[rule.source] if rule.source in subset else _objects([""] * len(subset))
        match_values = subset[rule.match_on] if rule.match_on and rule.match_on in subset else None
        part = pd.DataFrame(
            {
                "order": subset.index.to_numpy(),
                "rule": rule.index,
                "campaign_id": _objects([rule.id] * len(subset), index),
                "event_id": _objects(subset["event_id"].to_numpy(dtype=object), index),
                "time_gmt": subset["time_gmt"].to_numpy(dtype=float),
                "identity": _objects(last_value(source).to_numpy(dtype=object), index),
                "match_values": (
                    _objects(_text(match_values).to_numpy(dtype=object), index)
                    if match_values is not None else _objects([""] * len(subset), index)
                ),
            },
            index=index,
        )
        parts.append(part)
    if not parts:
        empty = {c: _objects([]) for c in CANDIDATE_COLUMNS}
        empty.update(order=pd.Series(dtype=np.int64), rule=pd.Series(dtype=np.int64), time_gmt=pd.Series(dtype=float))
        return pd.DataFrame(empty)
    candidates = pd.concat(parts, ignore_index=True)
    sequence = np.lexsort((candidates["rule"].to_numpy(), candidates["order"].to_numpy()))
    return candidates.take(sequence).reset_index(drop=True)


class Audience:
    """Recipients found for a batch, looked up by any identity column and by recipient_id."""

    def __init__(self, recipients: pd.DataFrame) -> None:
        self.frame = recipients.drop_duplicates("recipient_id").reset_index(drop=True)
        self._positions: dict[str, pd.Series] = {}

    def positions(self, column: str, values: np.ndarray) -> np.ndarray:
        """The row of the recipient whose ``column`` equals each value (-1 where none)."""
        if column not in self._positions:
            known = self.frame[column].notna().to_numpy(dtype=bool) if column in self.frame else np.zeros(len(self.frame), bool)
            keys = self.frame[column].to_numpy(dtype=object)[known] if column in self.frame else np.array([], dtype=object)
            lookup = pd.Series(np.flatnonzero(known), index=pd.Index(keys, dtype=object))
            self._positions[column] = lookup[~lookup.index.duplicated()]
        lookup = self._positions[column]
        found = lookup.index.get_indexer(values)  # one hash lookup a value, not map's then reindex's
        return np.where(found >= 0, lookup.to_numpy()[np.maximum(found, 0)], -1) if len(lookup) else found

    def rows(self, recipient_ids: np.ndarray) -> pd.DataFrame:
        """The recipients' rows in the order of ``recipient_ids`` (None where unknown)."""
        return self.rows_at(self.positions("recipient_id", recipient_ids))

    def rows_at(self, positions: np.ndarray) -> pd.DataFrame:
        """The rows at ``positions`` (None where -1)."""
        found = positions >= 0
        take = np.where(found, positions, 0)
        columns = {}
        for name in self.frame.columns:
            values = self.frame[name].to_numpy(dtype=object)[take] if len(self.frame) else np.full(len(take), None, dtype=object)
            values[~found] = None
            columns[name] = _objects(values)
        return pd.DataFrame(columns, index=pd.RangeIndex(len(take)))


def attach_recipients(candidates: pd.DataFrame, recipients: pd.DataFrame | Audience, rules: Sequence[Rule]) -> pd.DataFrame:
    """Add recipient_id, email, opted_out and ``person_<column>`` (the recipient's identities)."""
    audience = recipients if isinstance(recipients, Audience) else Audience(recipients)
    result = candidates.copy()
    positions = np.full(len(result), -1, dtype=np.int64)
    column_of_rule = {rule.index: rule.column for rule in rules}
    wanted = result["rule"].map(column_of_rule).to_numpy(dtype=object)
    identity = _text(result["identity"]).to_numpy(dtype=object)
    for column in sorted(set(column_of_rule.values())):
        rows = (wanted == column) & (identity != "")
        if rows.any():
            positions[rows] = audience.positions(column, identity[rows])
    found = audience.rows_at(positions)
    result["recipient_id"] = _objects(found["recipient_id"].to_numpy(dtype=object), result.index)
    result["email"] = _objects(found["email"].to_numpy(dtype=object), result.index)
    result["opted_out"] = found["opted_out"].fillna(False).to_numpy(dtype=bool)
    for column in person_columns(rules):
        values = found[column].to_numpy(dtype=object) if column in found else np.full(len(result), None, dtype=object)
        result[f"person_{column}"] = _objects(values, result.index)
    return result


def person_columns(rules: Sequence[Rule]) -> list[str]:
    return sorted({rule.column for rule in rules})


def audience_reasons(candidates: pd.DataFrame) -> pd.Series:
    """Why the audience rules out each candidate (None: it does not)."""
    from include.audience.load import email_is_valid

    email = _text(candidates["email"])
    reasons = np.full(len(candidates), None, dtype=object)
    reasons[~email_is_valid(email).to_numpy(dtype=bool)] = "invalid_email"
    reasons[~np.array(_each(str.strip, email), dtype=bool)] = "no_email"
    reasons[candidates["opted_out"].fillna(False).to_numpy(dtype=bool)] = "opted_out"
    reasons[pd.isna(candidates["recipient_id"]).to_numpy()] = "unknown_recipient"
    reasons[(_text(candidates["identity"]) == "").to_numpy(dtype=bool)] = "missing_identity"
    return _objects(reasons, candidates.index)


def cancellations(
    candidates: pd.DataFrame, cancelling: pd.DataFrame, rules: Sequence[Rule]
) -> pd.Series:
    """``cancelled_by:<trigger>`` for each candidate whose person fired its ``unless`` trigger.

    ``candidates``: rule, event_id, time_gmt, match_values, person_<column>...;
    ``cancelling``: staged events (event_id, trigger_id, time_gmt, identity sources, match_on).
    The cancelling event is the same person when one of its identities (under any campaign's
    identity mapping) equals the candidate's recipient's value of that column; it counts when
    its time lies in [t, t + within], both ends included, and it is not the candidate's event.
    """
    reasons = _objects(np.full(len(candidates), None, dtype=object), candidates.index)
    by_index = {rule.index: rule for rule in rules}
    with_unless = [rule.index for rule in rules if rule.unless_label is not None]
    active = candidates[candidates["rule"].isin(with_unless).to_numpy(dtype=bool)]
    if active.empty or cancelling.empty:
        return reasons
    cancelling = cancelling.reset_index(drop=True)
    marks: dict[str, list[pd.DataFrame]] = {}
    for source, column in identity_sources(rules):
        if source not in cancelling:
            continue
        values = last_value(cancelling[source])
        present = (values != "").to_numpy(dtype=bool)
        marks.setdefault(column, []).append(
            pd.DataFrame({"cancel": cancelling.index[present], "value": _objects(values[present].to_numpy(dtype=object))})
        )
    found = []
    for column in person_columns(rules):
        name = f"person_{column}"
        if name not in active or column not in marks:
            continue
        column_marks = pd.concat(marks[column], ignore_index=True)
        values = _text(active[name])
        # few candidates share a value with a cancelling event: merge only those
        shared = values.isin(column_marks["value"]).to_numpy(dtype=bool) & (values != "").to_numpy(dtype=bool)
        keys = pd.DataFrame({"candidate": active.index[shared], "value": _objects(values[shared].to_numpy(dtype=object))})
        found.append(keys.merge(column_marks, on="value")[["candidate", "cancel"]])
    if not found:
        return reasons
    pairs = pd.concat(found, ignore_index=True).drop_duplicates()
    if pairs.empty:
        return reasons
    cand = active.loc[pairs["candidate"].to_numpy()]
    canc = cancelling.loc[pairs["cancel"].to_numpy()]
    pairs = pairs.reset_index(drop=True).assign(
        rule=cand["rule"].to_numpy(),
        t=cand["time_gmt"].to_numpy(dtype=float),
        event=cand["event_id"].to_numpy(dtype=object),
        cancel_trigger=canc["trigger_id"].to_numpy(dtype=object),
        cancel_t=canc["time_gmt"].to_numpy(dtype=float),
        cancel_event=canc["event_id"].to_numpy(dtype=object),
    )
    within = pairs["rule"].map({i: by_index[i].hold for i in with_unless}).to_numpy(dtype=float)
    pairs = pairs[
        (pairs["cancel_t"].to_numpy() >= pairs["t"].to_numpy())
        & (pairs["cancel_t"].to_numpy() <= pairs["t"].to_numpy() + within)
        & (pairs["cancel_event"].to_numpy() != pairs["event"].to_numpy())
    ]
    for index in with_unless:
        rule = by_index[index]
        mine = pairs[(pairs["rule"] == index).to_numpy()]
        if rule.unless_ids is not None:
            mine = mine[mine["cancel_trigger"].isin(rule.unless_ids).to_numpy(dtype=bool)]
        if rule.match_on and len(mine):
            mine = mine.reset_index(drop=True)
            own = _exploded(_objects(candidates.loc[mine["candidate"].to_numpy(), "match_values"].to_numpy(dtype=object), mine.index))
            other_source = cancelling[rule.match_on] if rule.match_on in cancelling else _objects([""] * len(cancelling))
            other = _exploded(_objects(other_source.loc[mine["cancel"].to_numpy()].to_numpy(dtype=object), mine.index))
            own, other = own[own != ""], other[other != ""]
            shared = pd.DataFrame({"pair": own.index, "v": own.to_numpy(dtype=object)}).merge(
                pd.DataFrame({"pair": other.index, "v": other.to_numpy(dtype=object)}), on=["pair", "v"]
            )
            mine = mine.loc[shared["pair"].unique()]
        hit = np.unique(mine["candidate"].to_numpy())
        fresh = hit[reasons.loc[hit].isna().to_numpy()]
        reasons.loc[fresh] = f"cancelled_by:{rule.unless_label}"
    return reasons


def limit_reasons(
    candidates: pd.DataFrame,
    history: pd.DataFrame,
    rules: Sequence[Rule],
    per_recipient: tuple[int, float] | None,
) -> pd.Series:
    """``dedupe`` / ``frequency_cap`` for candidates still eligible, earliest first.

    ``candidates`` (recipient_id, campaign_id, time_gmt) must be in decision order; ``history``
    holds the live decisions already made (recipient_id, campaign_id, event_time). A person
    with one candidate in the batch is checked against the history in one vectorised pass; a
    person with several is scanned in order, since whether a later event is kept depends on
    which earlier ones were.
    """
    reasons = np.full(len(candidates), None, dtype=object)
    dedupe_of = {rule.id: rule.dedupe or 0.0 for rule in rules}
    if candidates.empty or (per_recipient is None and not any(dedupe_of.values())):
        return _objects(reasons, candidates.index)
    cap_max, cap_per = per_recipient if per_recipient else (0, 0.0)
    count = len(candidates)
    codes, _ = pd.factorize(
        np.concatenate([candidates["recipient_id"].to_numpy(dtype=object), history["recipient_id"].to_numpy(dtype=object)])
    )
    person, past_person = codes[:count], codes[count:]
    campaign = candidates["campaign_id"].to_numpy(dtype=object)
    when = candidates["time_gmt"].to_numpy(dtype=float)
    dedupe = candidates["campaign_id"].map(dedupe_of).to_numpy(dtype=float)
    several = np.bincount(person, minlength=codes.max() + 1)[person] > 1

    # one candidate: compare with that person's history, all at once
    past = pd.DataFrame(
        {"person": past_person, "past_campaign": history["campaign_id"].to_numpy(dtype=object),
         "past_time": history["event_time"].to_numpy(dtype=float)}
    )
    single = np.flatnonzero(~several)
    if len(past) and len(single):
        pairs = pd.DataFrame({"row": single, "person": person[single]}).merge(past, on="person")
        rows = pairs["row"].to_numpy()
        apart = np.abs(when[rows] - pairs["past_time"].to_numpy())
        same = pairs["past_campaign"].to_numpy(dtype=object) == campaign[rows]
        deduped = np.unique(rows[same & (apart < dedupe[rows])])
        reasons[deduped] = "dedupe"
        if per_recipient:
            near = np.bincount(rows[apart < cap_per], minlength=count)
            capped = np.flatnonzero(near >= cap_max)
            reasons[capped[pd.isna(reasons[capped])]] = "frequency_cap"

    # several candidates: a scan in decision order, with the history as the first kept
    scan = np.flatnonzero(several)
    if len(scan):
        kept: dict[int, list[tuple[str, float]]] = {}
        relevant = np.isin(past_person, person[scan])
        for who, what, at in zip(
            past_person[relevant].tolist(), past["past_campaign"].to_numpy()[relevant].tolist(),
            past["past_time"].to_numpy()[relevant].tolist(), strict=True,
        ):
            kept.setdefault(who, []).append((what, at))
        for row in scan.tolist():
            mine = kept.setdefault(int(person[row]), [])
            at, what, window = when[row], campaign[row], dedupe[row]
            if window and any(c == what and abs(t - at) < window for c, t in mine):
                reasons[row] = "dedupe"
            elif per_recipient and sum(abs(t - at) < cap_per for _, t in mine) >= cap_max:
                reasons[row] = "frequency_cap"
            else:
                mine.append((what, at))
    return _objects(reasons, candidates.index)


def screen(
    candidates: pd.DataFrame, recipients: pd.DataFrame | Audience, cancelling: pd.DataFrame, rules: Sequence[Rule]
) -> pd.DataFrame:
    """The candidates of a batch (``expand_candidates``) with their recipient and the audience
    and ``unless`` reasons."""
    candidates = attach_recipients(candidates, recipients, rules)
    reasons = audience_reasons(candidates)
    open_rows = reasons.isna().to_numpy()
    reasons[open_rows] = cancellations(candidates[open_rows], cancelling, rules).to_numpy()
    candidates["reason"] = reasons
    return candidates


def finish(candidates: pd.DataFrame, history: pd.DataFrame, config: TriggersConfig, rules: Sequence[Rule]) -> pd.DataFrame:
    """Apply dedupe and the frequency cap to screened candidates; return the decisions.

    Columns: campaign_id, recipient_id, email, event_id, event_time, status, reason, in decision
    order; the ``delivery_id`` is hashed where they are written (:func:`delivery_ids`).
    """
    reasons = candidates["reason"].copy()
    open_rows = reasons.isna().to_numpy()
    cap = config.limits.per_recipient
    reasons[open_rows] = limit_reasons(
        candidates[open_rows], history, rules, (cap.max, cap.per) if cap else None
    ).to_numpy()
    return pd.DataFrame(
        {
            "campaign_id": candidates["campaign_id"],
            "recipient_id": candidates["recipient_id"],
            "email": candidates["email"],
            "event_id": candidates["event_id"],
            "event_time": candidates["time_gmt"],
            "status": _objects(np.where(reasons.isna().to_numpy(), "pending", "suppressed")),
            "reason": reasons,
        }
    )


def decide(
    events: pd.DataFrame,
    recipients: pd.DataFrame | Audience,
    cancelling: pd.DataFrame,
    history: pd.DataFrame,
    config: TriggersConfig,
    rules: Sequence[Rule] | None = None,
) -> pd.DataFrame:
    """The decisions for a batch of ready events: one row per (event, campaign) that applies.

    ``recipients``: the audience rows (recipient_id, email, opted_out, identity columns);
    ``cancelling``: staged events that may cancel (see :func:`cancellations`); ``history``: live
    decisions already made, not of these events (recipient_id, campaign_id, event_time).
    """
    rules = compile_rules(config) if rules is None else rules
    return finish(screen(expand_candidates(events, rules), recipients, cancelling, rules), history, config, rules)


# --- the database edges -----------------------------------------------------------------------


def _frame(
    conn: Connection, sql: str, params: dict[str, Any], columns: Sequence[str], floats: Sequence[str] = ()
) -> pd.DataFrame:
    """Run ``sql`` (``:name`` parameters) on the DBAPI cursor: plain tuples, built column-wise.

    SQLAlchemy's row objects, and pandas' check of every value of a str column, cost more than
    the query itself at a million rows: text comes back as object columns.
    """
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(driver_sql(conn, sql), params)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    values = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return pd.DataFrame(
        {
            name: np.array(column, dtype=float) if name in floats else _objects(column)
            for name, column in zip(columns, values, strict=True)
        },
        index=pd.RangeIndex(len(rows)),
    )


def _quoted(column: str) -> str:
    return f'"{column}"'


def _event_columns(config: TriggersConfig) -> list[str]:
    return ["event_id", "trigger_id", "time_gmt", MC_ID, *(dimension_column(d) for d in config.dimensions)]


def _holds(rules: Sequence[Rule]) -> tuple[dict[str, float], float]:
    """How long each trigger's events wait: the longest ``unless`` of the campaigns it feeds."""
    default = max([rule.hold for rule in rules if rule.trigger_ids is None], default=0.0)
    per_trigger: dict[str, float] = {}
    for rule in rules:
        for trigger_id in rule.trigger_ids or ():
            per_trigger[trigger_id] = max(per_trigger.get(trigger_id, default), rule.hold)
    return per_trigger, default


@dataclass(frozen=True)
class Frontier:
    """A trigger's row of ``matching_frontier``: none of its journal events older than
    ``low_time`` is still new; ``version`` rises whenever one of its events is staged."""

    trigger_id: str
    low_time: float
    version: int


def read_frontier(conn: Connection) -> list[Frontier]:
    rows = conn.execute(text("SELECT trigger_id, low_time, version FROM matching_frontier ORDER BY trigger_id"))
    return [Frontier(str(t), float(low), int(version)) for t, low, version in rows]


def _hold_of(rules: Sequence[Rule], trigger_id: str) -> float:
    per_trigger, default = _holds(rules)
    return per_trigger.get(trigger_id, default)


def latest_ready_time(now: float, hold: float) -> float:
    """The largest time t with ``t + hold <= now`` in floating point, as both databases add: a
    plain bound on the indexed column instead of an expression (exact at the window's end)."""
    bound = now - hold
    while bound + hold > now:
        bound = math.nextafter(bound, -math.inf)
    while (above := math.nextafter(bound, math.inf)) + hold <= now:
        bound = above
    return bound


def read_ready_events(
    conn: Connection,
    config: TriggersConfig,
    rules: Sequence[Rule],
    *,
    frontier: Sequence[Frontier],
    now: float,
    interval: tuple[float, float] | None,
    limit: int,
    after: tuple[float, str] | None = None,
) -> pd.DataFrame:
    """The next ``limit`` new events whose windows have closed, in (time, event id) order, after
    the (time, event id) ``after`` when given: a run's later batches do not wait for the commit
    of its earlier ones.

    One index range per trigger of the ``frontier``: from its ``low_time`` (or the backfill's
    interval) to where its hold ends, merged in time order by the database.
    """
    columns = _event_columns(config)
    # byte order for ties on both databases, as Python compares. The row's physical address
    # (SQLite's rowid, PostgreSQL's ctid) lets the status update reach it without the key index.
    postgres = conn.dialect.name == "postgresql"
    row_key = "ctid::text" if postgres else "rowid"
    tie_order = 'event_id COLLATE "C"' if postgres else "event_id"
    params: dict[str, Any] = {"limit": limit}
    shared = ["status = 'new'"]
    if interval is not None:
        shared += ["time_gmt >= :start", "time_gmt < :end"]
        params["start"], params["end"] = interval
    else:  # imported events wait for the backfill of their interval
        shared.append(f"position <> '{IMPORTED_POSITION}'")
    if after is not None:
        shared.append(f"time_gmt >= :after_time AND (time_gmt > :after_time OR {tie_order} > :after_id)")
        params["after_time"], params["after_id"] = after
    selected = ", ".join([*map(_quoted, columns), f"{row_key} AS row_key"])
    arms = []
    for number, row in enumerate(frontier):
        hold = _hold_of(rules, row.trigger_id)
        params[f"t{number}"], params[f"until{number}"] = row.trigger_id, latest_ready_time(now, hold)
        conditions = [f"trigger_id = :t{number}", f"time_gmt <= :until{number}"]
        if interval is None:
            conditions.append(f"time_gmt >= :low{number}")
            params[f"low{number}"] = row.low_time
        arm = f"SELECT {selected} FROM pipeline_events WHERE {' AND '.join(conditions + shared)}"
        # PostgreSQL reads (and merges) the index ranges only when each is ordered and limited;
        # SQLite merges a compound's ranges itself, and would sort ordered subqueries again
        arms.append(f"SELECT * FROM ({arm} ORDER BY time_gmt, {tie_order} LIMIT :limit) AS arm{number}" if postgres else arm)
    if not arms:
        arms.append(f"SELECT {selected} FROM pipeline_events WHERE 1 = 0")
    ready = " UNION ALL ".join(arms)
    if postgres:  # its compound ORDER BY takes output columns only, not a collation
        ready = f"SELECT * FROM ({ready}) AS ready"
    sql = f"{ready} ORDER BY time_gmt, {tie_order} LIMIT :limit"
    return _frame(conn, sql, params, [*columns, "row_key"], floats=("time_gmt",))


def advance_frontier(conn: Connection, rules: Sequence[Rule], frontier: Sequence[Frontier], now: float) -> None:
    """After a run that decided every ready journal event: move each trigger's frontier to where
    its hold ends, unless an event of it was staged since the run read the frontier (its version
    moved: that event may be older and unseen)."""
    for row in frontier:
        low = latest_ready_time(now, _hold_of(rules, row.trigger_id))
        if low > row.low_time:
            conn.execute(
                text("UPDATE matching_frontier SET low_time = :low WHERE trigger_id = :t AND version = :version"),
                {"low": low, "t": row.trigger_id, "version": row.version},
            )


def _recipient_columns(rules: Sequence[Rule]) -> list[str]:
    return ["recipient_id", "email", "opted_out", *[c for c in person_columns(rules) if c not in ("recipient_id", "email")]]


def read_recipients(conn: Connection, lookups: dict[str, Iterable[str]], rules: Sequence[Rule]) -> pd.DataFrame:
    """The recipients whose ``column`` is one of the values, for each column of ``lookups``."""
    columns = _recipient_columns(rules)
    parts = []
    for column, values in lookups.items():
        values = list({v for v in values if v})
        if values:
            sql = f"SELECT {', '.join(map(_quoted, columns))} FROM recipients WHERE {in_list(conn, _quoted(column), 'values')}"
            parts.append(_frame(conn, sql, {"values": list_param(conn, values)}, columns))
    found = pd.concat(parts, ignore_index=True) if parts else _frame_of(columns)
    return found.drop_duplicates("recipient_id").reset_index(drop=True)


def read_all_recipients(conn: Connection, rules: Sequence[Rule]) -> pd.DataFrame:
    columns = _recipient_columns(rules)
    return _frame(conn, f"SELECT {', '.join(map(_quoted, columns))} FROM recipients", {}, columns)


def _frame_of(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: _objects([]) for c in columns})


class AudienceReader:
    """Finds a run's recipients: by lookups for small batches, by one full read for a backlog.

    Looking up a value costs a few times reading a row, so once a batch asks for more than
    1/``FULL_READ_FACTOR`` of the audience, the needed columns of every recipient are read once
    and kept for the rest of the run (at most ``FULL_READ_LIMIT`` recipients).
    """

    FULL_READ_FACTOR = 8
    FULL_READ_LIMIT = 5_000_000

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = rules
        self.size: int | None = None
        self.everyone: Audience | None = None

    def for_batch(self, conn: Connection, lookups: dict[str, set[str]]) -> Audience:
        if self.everyone is not None:
            return self.everyone
        wanted = sum(len(values) for values in lookups.values())
        if self.size is None:
            self.size = int(conn.execute(text("SELECT count(*) FROM recipients")).scalar_one())
        if wanted * self.FULL_READ_FACTOR >= self.size and self.size <= self.FULL_READ_LIMIT:
            self.everyone = Audience(read_all_recipients(conn, self.rules))
            return self.everyone
        return Audience(read_recipients(conn, lookups, self.rules))


def read_cancelling(
    conn: Connection, config: TriggersConfig, rules: Sequence[Rule], start: float, end: float
) -> pd.DataFrame:
    """Staged events of any ``unless`` trigger with ``start <= time_gmt <= end``, any status."""
    with_unless = [rule for rule in rules if rule.unless_label is not None]
    available = {MC_ID, *(dimension_column(d) for d in config.dimensions)}
    wanted = {source for source, _ in identity_sources(rules)} | {r.match_on for r in with_unless if r.match_on}
    columns = ["event_id", "trigger_id", "time_gmt", *sorted(wanted & available)]
    if not with_unless:
        return _frame_of(columns)
    params: dict[str, Any] = {"start": start, "end": end}
    statuses = ", ".join(f"'{s}'" for s in STAGED_STATUSES)
    conditions = [f"status IN ({statuses})", "time_gmt >= :start", "time_gmt <= :end"]
    if all(rule.unless_ids is not None for rule in with_unless):
        ids = sorted(set().union(*(rule.unless_ids or () for rule in with_unless)))
        if not ids:
            return _frame_of(columns)
        conditions.append(in_list(conn, "trigger_id", "triggers"))
        params["triggers"] = list_param(conn, ids)
    sql = f"SELECT {', '.join(map(_quoted, columns))} FROM pipeline_events WHERE {' AND '.join(conditions)}"
    return _frame(conn, sql, params, columns, floats=("time_gmt",))


def read_history(
    conn: Connection, recipient_ids: Iterable[str], start: float, end: float, not_decided_at: float | None = None
) -> pd.DataFrame:
    """Live decisions in ``deliveries`` for these recipients with start <= event_time <= end
    (except those taken at ``not_decided_at``: the current run's, which it keeps itself)."""
    ids = list(set(recipient_ids))
    if not ids:
        return _no_history()
    statuses = ", ".join(f"'{s}'" for s in LIVE_STATUSES)
    params: dict[str, Any] = {"ids": list_param(conn, ids), "start": start, "end": end}
    sql = (
        f"SELECT {', '.join(HISTORY_COLUMNS)} FROM deliveries WHERE {in_list(conn, 'recipient_id', 'ids')} "
        f"AND event_time >= :start AND event_time <= :end AND status IN ({statuses})"
    )
    if not_decided_at is not None:
        sql += " AND decided_at <> :not_decided_at"
        params["not_decided_at"] = not_decided_at
    return _frame(conn, sql, params, HISTORY_COLUMNS, floats=("event_time",))


def _no_history() -> pd.DataFrame:
    return _frame_of(HISTORY_COLUMNS).astype({"event_time": float})


def _limit_window(config: TriggersConfig, rules: Sequence[Rule]) -> float:
    cap = config.limits.per_recipient
    return max([rule.dedupe or 0.0 for rule in rules] + [cap.per if cap else 0.0])


def _mark_events(conn: Connection, events: pd.DataFrame, status: str, at: float) -> None:
    """Set the events' status, by row address when read with one (``row_key``), else by event_id.

    A row updated by someone else since it was read has moved (PostgreSQL) and is missed by its
    address: the events still ``new`` then are marked by event_id.
    """
    if events.empty:
        return
    statement = "UPDATE pipeline_events SET status = :status, processed_at = :at WHERE "
    params: dict[str, Any] = {"status": status, "at": at}
    if "row_key" in events:
        postgres = conn.dialect.name == "postgresql"
        where = "ctid = ANY(CAST(:keys AS tid[]))" if postgres else "rowid IN (SELECT value FROM json_each(:keys))"
        keys = list_param(conn, events["row_key"].tolist())
        if conn.execute(text(statement + where + " AND status = 'new'"), {**params, "keys": keys}).rowcount == len(events):
            return
    where = f"{in_list(conn, 'event_id', 'ids')} AND status = 'new'"
    conn.execute(text(statement + where), {**params, "ids": list_param(conn, events["event_id"].tolist())})


def _delivery_rows(decisions: pd.DataFrame, decided_at: float) -> list[tuple[Any, ...]]:
    columns = []
    for name in DELIVERY_COLUMNS:
        if name == "delivery_id":  # hashed by the writer: the deciding process is the slower one
            columns.append(delivery_ids(decisions["campaign_id"], decisions["recipient_id"], decisions["event_id"]))
        elif name == "decided_at":
            columns.append([decided_at] * len(decisions))
        elif name == "attempts":
            columns.append([0] * len(decisions))
        elif name == "event_time":
            columns.append(decisions[name].to_numpy(dtype=float).tolist())
        elif name in ("recipient_id", "email", "reason"):  # the columns that can be missing
            values = decisions[name].to_numpy(dtype=object)
            columns.append(np.where(pd.isna(values), None, values).tolist())
        else:
            columns.append(decisions[name].to_numpy(dtype=object).tolist())
    return list(zip(*columns, strict=True))


def decide_batch(
    conn: Connection,
    config: TriggersConfig,
    events: pd.DataFrame,
    rules: Sequence[Rule],
    reader: AudienceReader,
    run: RunDecisions,
) -> pd.DataFrame:
    """Decide a batch of events, reading the audience, cancelling events and history in ``conn``."""
    candidates = expand_candidates(events, rules)
    lookups: dict[str, set[str]] = {}
    column_of_rule = {rule.index: rule.column for rule in rules}
    for index, identities in candidates.groupby("rule")["identity"]:
        lookups.setdefault(column_of_rule[int(index)], set()).update(v for v in identities.tolist() if v)
    audience = reader.for_batch(conn, lookups)
    times = events["time_gmt"].to_numpy(dtype=float)
    start, end = float(times.min()), float(times.max())
    max_hold = max([rule.hold for rule in rules], default=0.0)
    cancelling = read_cancelling(conn, config, rules, start, end + max_hold)
    screened = screen(candidates, audience, cancelling, rules)
    window = _limit_window(config, rules)
    history = _no_history()
    if window:
        open_people = screened.loc[screened["reason"].isna().to_numpy(), "recipient_id"].unique()
        bounds = (start - window, end + window)
        earlier_runs = read_history(conn, open_people.tolist(), *bounds, not_decided_at=run.decided_at)
        if len(earlier_runs):  # a decision already taken for one of these events is not history
            earlier_runs = earlier_runs[~earlier_runs["event_id"].isin(events["event_id"]).to_numpy(dtype=bool)]
        history = pd.concat([earlier_runs, run.history(open_people, *bounds)], ignore_index=True)
    return finish(screened, history, config, rules)


def write_batch(conn: Connection, events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float) -> None:
    """The batch's decisions and its events' statuses, in ``conn``'s transaction."""
    bulk_write(conn, deliveries, DELIVERY_COLUMNS, _delivery_rows(decisions, decided_at), conflict="nothing")
    matched = events["event_id"].isin(decisions["event_id"]).to_numpy(dtype=bool)
    _mark_events(conn, events[matched], "matched", decided_at)
    _mark_events(conn, events[~matched], "unmatched", decided_at)


class RunDecisions:
    """The live decisions of one matching run, for the dedupe and frequency checks of its later
    batches: those may not be committed yet when the next batch is decided."""

    def __init__(self, decided_at: float) -> None:
        self.decided_at = decided_at  # every decision of the run carries it
        self.parts: list[pd.DataFrame] = []

    def add(self, decisions: pd.DataFrame) -> None:
        live = (decisions["status"] == "pending").to_numpy(dtype=bool)
        self.parts.append(
            pd.DataFrame({c: decisions[c].to_numpy()[live] for c in HISTORY_COLUMNS})  # not every column's take
        )

    def history(self, recipient_ids: np.ndarray, start: float, end: float) -> pd.DataFrame:
        if not self.parts:
            return _no_history()
        if len(self.parts) > 1:
            self.parts = [pd.concat(self.parts, ignore_index=True)]
        known = self.parts[0]
        times = known["event_time"].to_numpy(dtype=float)
        keep = (times >= start) & (times <= end) & known["recipient_id"].isin(recipient_ids).to_numpy(dtype=bool)
        return known[keep]


class _BatchWriter:
    """Commits each batch (decisions and statuses, one transaction) in order, from a second
    process once a batch is full, while the next batch is decided: the database's work overlaps
    pandas'. A thread would wait for the GIL at every row SQLite writes and at every part psycopg
    copies (measured: PostgreSQL 71 -> 60 s at 1M events with a process). At most two batches
    wait; the first error stops the writes and is raised to the caller."""

    PROCESS_MIN_EVENTS = 20_000  # a full batch this large pays for starting a process (~1 s)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.process: ProcessPoolExecutor | None = None
        self.written: deque[Future[None]] = deque()
        self.may_spawn = engine.url.database not in (None, "", ":memory:")  # another process sees the file

    def submit(self, events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float, full: bool) -> None:
        self._raise()
        if full and len(events) >= self.PROCESS_MIN_EVENTS and self.process is None and self.may_spawn:
            url = self.engine.url.render_as_string(hide_password=False)
            try:
                self.process = spawn_pool(1, _start_writer_process, (url,))
            except (OSError, AssertionError, ValueError) as error:  # e.g. a daemonic process may not have children
                log.warning("matching writes in this process: cannot start a writer process (%s)", type(error).__name__)
                self.may_spawn = False
        if self.process is None:
            with self.engine.begin() as conn:
                write_batch(conn, events, decisions, decided_at)
            return
        while len(self.written) >= 2:
            self._settle(self.written.popleft())
        self.written.append(self.process.submit(_write_in_process, events[["event_id", "row_key"]], decisions, decided_at))

    def close(self) -> None:
        if self.process is not None:
            while self.written:
                self._settle(self.written.popleft())
            self.process.shutdown()
        self._raise()

    def _settle(self, written: Future[None]) -> None:
        try:
            written.result()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
            self.error = self.error or error

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


_WRITER_ENGINE: list[Engine] = []  # the writer process's engine
_WRITER_FAILED: list[BaseException] = []  # its first failed write: the later batches are refused


def _start_writer_process(url: str) -> None:
    from include.database.engine import make_engine

    _WRITER_ENGINE.append(make_engine(url))


def _write_in_process(events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float) -> None:
    if _WRITER_FAILED:  # batches commit in order or not at all
        raise RuntimeError(f"an earlier batch was not written: {_WRITER_FAILED[0]}")
    try:
        with collector_paused(), _WRITER_ENGINE[0].begin() as conn:
            write_batch(conn, events, decisions, decided_at)
    except BaseException as error:
        _WRITER_FAILED.append(error)
        raise


FIRST_BATCH_EVENTS = 50_000


def match_ready_events(
    engine: Engine,
    config: TriggersConfig,
    *,
    now: float,
    interval: tuple[float, float] | None = None,
    batch_size: int = 200_000,
) -> dict[str, int]:
    """Decide every staged event that is ready, in time order and bounded batches.

    Ready: status ``new`` and every ``unless`` window of its campaigns closed at ``now``
    (``time_gmt + within <= now``); with ``interval=(start, end)`` (a backfill) also
    ``start <= time_gmt < end``. Each batch commits its decisions with its events' statuses.
    Returns counts: ready, matched, unmatched, pending, suppressed_<reason>...
    """
    rules = compile_rules(config)
    reader = AudienceReader(rules)
    run = RunDecisions(decided_at=time.time())
    counts: dict[str, int] = {"ready": 0, "matched": 0, "unmatched": 0, "pending": 0}
    after: tuple[float, str] | None = None
    with engine.connect() as conn:
        frontier = read_frontier(conn)
    writer = _BatchWriter(engine)
    try:
        with collector_paused():  # the batches' row tuples are garbage only when dropped
            while True:
                with engine.connect() as conn:
                    # a smaller first batch: the writer starts sooner, and it is the slower side
                    limit = batch_size if after is not None else min(batch_size, FIRST_BATCH_EVENTS)
                    events = read_ready_events(
                        conn, config, rules, frontier=frontier, now=now, interval=interval, limit=limit, after=after
                    )
                    if events.empty:
                        break
                    decisions = decide_batch(conn, config, events, rules, reader, run)
                writer.submit(events, decisions, run.decided_at, full=len(events) == limit)
                run.add(decisions)
                after = (float(events["time_gmt"].iat[-1]), str(events["event_id"].iat[-1]))
                matched = decisions["event_id"].nunique()
                counts["ready"] += len(events)
                counts["matched"] += matched
                counts["unmatched"] += len(events) - matched
                counts["pending"] += int((decisions["status"] == "pending").sum())
                for reason, number in decisions["reason"].dropna().value_counts().items():
                    counts[f"suppressed_{reason}"] = counts.get(f"suppressed_{reason}", 0) + int(number)
                if len(events) < limit:
                    break
    finally:
        writer.close()
    if interval is None:  # every ready journal event is decided and committed
        with engine.begin() as conn:
            advance_frontier(conn, rules, frontier, now)
    return counts
