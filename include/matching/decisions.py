"""A candidate's fate, steps 4 to 6 of a decision (SPEC sections 5, 7): pure pandas.

4. audience: ``missing_identity``, ``unknown_recipient``, ``opted_out``, the reason of a
   suppression of the address (``unsubscribed``, ``hard_bounce``, ``complaint``, ``manual``:
   for every campaign or this one, SPEC section 9), ``no_email``, ``invalid_email``; the PERSON
   is the recipient found, so one person reached through a shopper id and through an mcId is
   one person everywhere below;
5. ``unless``: ``cancelled_by:<trigger>`` when the same person fired the cancelling trigger at a
   time in ``[t, t + within]`` (both edges inclusive), among all staged events whatever their
   status; with ``match_on`` the two events must share a value of that dimension;
6. ``dedupe`` and ``limits.per_recipient``, earliest events first (time, then event id, then the
   campaign's order in the file): ``dedupe`` when the person has another live decision of the
   campaign less than ``dedupe`` apart, ``frequency_cap`` when ``max`` live decisions of any
   campaign lie less than ``per`` apart. Live: pending, sending or sent, in this batch or already
   in ``deliveries``. A pending email of a campaign that is not enabled (switched off or removed)
   is *waiting*: it counts toward its own campaign's dedupe (no pile of them goes out when it is
   switched back on) but toward no frequency cap (it may never go out).

The first reason in that order wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from include.config import TriggersConfig
from include.matching.rules import Rule, compile_rules, expand_candidates, identity_sources, person_columns
from include.matching.values import each, empty_frame, exploded, last_value, objects, text_column
from include.suppressions.store import suppressed_reason

# the suppressions of some addresses: (address key, campaign_id) -> reason (store.reasons_for)
SuppressionLookup = Callable[[Iterable[str]], Mapping[tuple[str, str], str]]

HISTORY_COLUMNS = ["recipient_id", "campaign_id", "event_time", "event_id"]  # live decisions, for dedupe
WAITING = "waiting"  # history's flag: a pending email of a campaign not enabled (see the docstring)


def delivery_ids(campaign_ids: pd.Series, recipient_ids: pd.Series, event_ids: pd.Series) -> list[str]:
    """The stable id of a decision: sha256 of campaign, recipient and event, 32 hex digits."""
    sha256 = hashlib.sha256
    return [
        sha256(f"{c}\x1f{r}\x1f{e}".encode()).hexdigest()[:32]
        for c, r, e in zip(
            campaign_ids.tolist(), _none_to_empty(recipient_ids), event_ids.tolist(), strict=True
        )
    ]


def _none_to_empty(values: pd.Series) -> list[str]:
    return ["" if v is None or v != v else v for v in values.tolist()]  # v != v: NaN


def no_history() -> pd.DataFrame:
    return empty_frame([*HISTORY_COLUMNS, WAITING]).astype({"event_time": float, WAITING: bool})


def enabled_campaigns(rules: Sequence[Rule]) -> frozenset[str]:
    return frozenset(rule.id for rule in rules if rule.campaign.enabled)


# --- the audience -----------------------------------------------------------------------------


class Audience:
    """Recipients found for a batch, looked up by any identity column and by recipient_id."""

    def __init__(self, recipients: pd.DataFrame) -> None:
        self.frame = recipients.drop_duplicates("recipient_id").reset_index(drop=True)
        self._positions: dict[str, pd.Series] = {}

    def positions(self, column: str, values: np.ndarray) -> np.ndarray:
        """The row of the recipient whose ``column`` equals each value (-1 where none)."""
        if column not in self._positions:
            if column in self.frame:
                known = self.frame[column].notna().to_numpy(dtype=bool)
                keys = self.frame[column].to_numpy(dtype=object)[known]
            else:
                known, keys = np.zeros(len(self.frame), bool), np.array([], dtype=object)
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
            if len(self.frame):
                values = self.frame[name].to_numpy(dtype=object)[take]
            else:
                values = np.full(len(take), None, dtype=object)
            values[~found] = None
            columns[name] = objects(values)
        return pd.DataFrame(columns, index=pd.RangeIndex(len(take)))


def attach_recipients(
    candidates: pd.DataFrame, recipients: pd.DataFrame | Audience, rules: Sequence[Rule]
) -> pd.DataFrame:
    """Add recipient_id, email, opted_out and ``person_<column>`` (the recipient's identities)."""
    audience = recipients if isinstance(recipients, Audience) else Audience(recipients)
    result = candidates.copy()
    positions = np.full(len(result), -1, dtype=np.int64)
    column_of_rule = {rule.index: rule.column for rule in rules}
    wanted = result["rule"].map(column_of_rule).to_numpy(dtype=object)
    identity = text_column(result["identity"]).to_numpy(dtype=object)
    for column in sorted(set(column_of_rule.values())):
        rows = (wanted == column) & (identity != "")
        if rows.any():
            positions[rows] = audience.positions(column, identity[rows])
    found = audience.rows_at(positions)
    result["recipient_id"] = objects(found["recipient_id"].to_numpy(dtype=object), result.index)
    result["email"] = objects(found["email"].to_numpy(dtype=object), result.index)
    result["opted_out"] = found["opted_out"].fillna(False).to_numpy(dtype=bool)
    for column in person_columns(rules):
        values = (
            found[column].to_numpy(dtype=object)
            if column in found
            else np.full(len(result), None, dtype=object)
        )
        result[f"person_{column}"] = objects(values, result.index)
    return result


def attach_suppressions(candidates: pd.DataFrame, lookup: SuppressionLookup) -> None:
    """Add ``suppression``: the reason the candidate's address may not receive its campaign, else
    None. ``lookup`` is called once, with the addresses of the recipients found."""
    found_rows = candidates["recipient_id"].notna().to_numpy(dtype=bool)
    emails = candidates["email"].to_numpy(dtype=object)
    found = lookup(e for e in emails[found_rows].tolist() if isinstance(e, str)) if found_rows.any() else {}
    values = np.full(len(candidates), None, dtype=object)
    if found:
        campaigns = candidates["campaign_id"].to_numpy(dtype=object)
        for row in np.flatnonzero(found_rows).tolist():
            if isinstance(emails[row], str):
                values[row] = suppressed_reason(found, emails[row], campaigns[row])
    candidates["suppression"] = objects(values, candidates.index)


def audience_reasons(candidates: pd.DataFrame) -> pd.Series:
    """Why the audience rules out each candidate (None: it does not); a ``suppression`` column
    (:func:`attach_suppressions`) is a reason too, after ``opted_out``."""
    from include.audience.load import email_is_valid

    email = text_column(candidates["email"])
    reasons = np.full(len(candidates), None, dtype=object)
    reasons[~email_is_valid(email).to_numpy(dtype=bool)] = "invalid_email"
    reasons[~np.array(each(str.strip, email), dtype=bool)] = "no_email"
    if "suppression" in candidates:
        suppression = candidates["suppression"].to_numpy(dtype=object)
        suppressed = ~pd.isna(suppression)
        reasons[suppressed] = suppression[suppressed]
    reasons[candidates["opted_out"].fillna(False).to_numpy(dtype=bool)] = "opted_out"
    reasons[pd.isna(candidates["recipient_id"]).to_numpy()] = "unknown_recipient"
    reasons[(text_column(candidates["identity"]) == "").to_numpy(dtype=bool)] = "missing_identity"
    return objects(reasons, candidates.index)


# --- unless -----------------------------------------------------------------------------------


def cancellations(candidates: pd.DataFrame, cancelling: pd.DataFrame, rules: Sequence[Rule]) -> pd.Series:
    """``cancelled_by:<trigger>`` for each candidate whose person fired its ``unless`` trigger.

    ``candidates``: rule, event_id, time_gmt, match_values, person_<column>...;
    ``cancelling``: staged events (event_id, trigger_id, time_gmt, identity sources, match_on).
    The cancelling event is the same person when one of its identities (under any campaign's
    identity mapping) equals the candidate's recipient's value of that column; it counts when
    its time lies in [t, t + within], both ends included, and it is not the candidate's event.
    """
    reasons = objects(np.full(len(candidates), None, dtype=object), candidates.index)
    with_unless = [rule for rule in rules if rule.unless_label is not None]
    active = candidates[candidates["rule"].isin([rule.index for rule in with_unless]).to_numpy(dtype=bool)]
    if active.empty or cancelling.empty:
        return reasons
    cancelling = cancelling.reset_index(drop=True)
    pairs = _same_person(active, cancelling, rules)
    if pairs is None:
        return reasons
    pairs = _within_windows(pairs, active, cancelling, with_unless)
    for rule in with_unless:
        mine = pairs[(pairs["rule"] == rule.index).to_numpy()]
        if rule.unless_ids is not None:
            mine = mine[mine["cancel_trigger"].isin(rule.unless_ids).to_numpy(dtype=bool)]
        if rule.match_on and len(mine):
            mine = _sharing_a_value(mine, candidates, cancelling, rule.match_on)
        hit = np.unique(mine["candidate"].to_numpy())
        fresh = hit[reasons.loc[hit].isna().to_numpy()]
        reasons.loc[fresh] = f"cancelled_by:{rule.unless_label}"
    return reasons


def _identity_marks(cancelling: pd.DataFrame, rules: Sequence[Rule]) -> dict[str, list[pd.DataFrame]]:
    """Per recipients column: the cancelling events (``cancel``) and the identity they name."""
    marks: dict[str, list[pd.DataFrame]] = {}
    for source, column in identity_sources(rules):
        if source not in cancelling:
            continue
        values = last_value(cancelling[source])
        present = (values != "").to_numpy(dtype=bool)
        marks.setdefault(column, []).append(
            pd.DataFrame(
                {
                    "cancel": cancelling.index[present],
                    "value": objects(values[present].to_numpy(dtype=object)),
                }
            )
        )
    return marks


def _same_person(
    active: pd.DataFrame, cancelling: pd.DataFrame, rules: Sequence[Rule]
) -> pd.DataFrame | None:
    """The (candidate, cancel) pairs whose cancelling event names the candidate's person; None: none."""
    marks = _identity_marks(cancelling, rules)
    found = []
    for column in person_columns(rules):
        name = f"person_{column}"
        if name not in active or column not in marks:
            continue
        column_marks = pd.concat(marks[column], ignore_index=True)
        values = text_column(active[name])
        # few candidates share a value with a cancelling event: merge only those
        shared = values.isin(column_marks["value"]).to_numpy(dtype=bool) & (values != "").to_numpy(dtype=bool)
        keys = pd.DataFrame(
            {"candidate": active.index[shared], "value": objects(values[shared].to_numpy(dtype=object))}
        )
        found.append(keys.merge(column_marks, on="value")[["candidate", "cancel"]])
    if not found:
        return None
    pairs = pd.concat(found, ignore_index=True).drop_duplicates()
    return None if pairs.empty else pairs


def _within_windows(
    pairs: pd.DataFrame, active: pd.DataFrame, cancelling: pd.DataFrame, with_unless: Sequence[Rule]
) -> pd.DataFrame:
    """The pairs whose cancelling event lies in the candidate's window and is another event."""
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
    within = pairs["rule"].map({rule.index: rule.hold for rule in with_unless}).to_numpy(dtype=float)
    return pairs[
        (pairs["cancel_t"].to_numpy() >= pairs["t"].to_numpy())
        & (pairs["cancel_t"].to_numpy() <= pairs["t"].to_numpy() + within)
        & (pairs["cancel_event"].to_numpy() != pairs["event"].to_numpy())
    ]


def _sharing_a_value(
    mine: pd.DataFrame, candidates: pd.DataFrame, cancelling: pd.DataFrame, match_on: str
) -> pd.DataFrame:
    """The pairs whose two events share a value of the ``match_on`` dimension."""
    mine = mine.reset_index(drop=True)
    own_values = candidates.loc[mine["candidate"].to_numpy(), "match_values"].to_numpy(dtype=object)
    own = exploded(objects(own_values, mine.index))
    other_source = cancelling[match_on] if match_on in cancelling else objects([""] * len(cancelling))
    other = exploded(objects(other_source.loc[mine["cancel"].to_numpy()].to_numpy(dtype=object), mine.index))
    own, other = own[own != ""], other[other != ""]
    shared = pd.DataFrame({"pair": own.index, "v": own.to_numpy(dtype=object)}).merge(
        pd.DataFrame({"pair": other.index, "v": other.to_numpy(dtype=object)}), on=["pair", "v"]
    )
    return mine.loc[shared["pair"].unique()]


# --- dedupe and the frequency cap -------------------------------------------------------------


@dataclass(frozen=True)
class _LimitInputs:
    """What both passes of :func:`limit_reasons` read: per candidate, and the history."""

    person: np.ndarray  # a code per person, shared with ``past_person``
    campaign: np.ndarray
    when: np.ndarray
    dedupe: np.ndarray  # the campaign's dedupe window, 0 for none
    waiting: np.ndarray  # the campaign is not enabled: kept, it counts toward no frequency cap
    past_person: np.ndarray
    past: pd.DataFrame  # person, past_campaign, past_time, past_waiting
    per_recipient: tuple[int, float] | None


def limit_reasons(
    candidates: pd.DataFrame,
    history: pd.DataFrame,
    rules: Sequence[Rule],
    per_recipient: tuple[int, float] | None,
) -> pd.Series:
    """``dedupe`` / ``frequency_cap`` for candidates still eligible, earliest first.

    ``candidates`` (recipient_id, campaign_id, time_gmt) must be in decision order; ``history``
    holds the live decisions already made (recipient_id, campaign_id, event_time, and
    ``waiting``: False when absent). A person
    with one candidate in the batch is checked against the history in one vectorised pass; a
    person with several is scanned in order, since whether a later event is kept depends on
    which earlier ones were.
    """
    reasons = np.full(len(candidates), None, dtype=object)
    dedupe_of = {rule.id: rule.dedupe or 0.0 for rule in rules}
    if candidates.empty or (per_recipient is None and not any(dedupe_of.values())):
        return objects(reasons, candidates.index)
    count = len(candidates)
    people = [
        candidates["recipient_id"].to_numpy(dtype=object),
        history["recipient_id"].to_numpy(dtype=object),
    ]
    codes, _ = pd.factorize(np.concatenate(people))
    person, past_person = codes[:count], codes[count:]
    past = pd.DataFrame(
        {
            "person": past_person,
            "past_campaign": history["campaign_id"].to_numpy(dtype=object),
            "past_time": history["event_time"].to_numpy(dtype=float),
            "past_waiting": (
                history[WAITING].to_numpy(dtype=bool) if WAITING in history else np.zeros(len(history), bool)
            ),
        }
    )
    inputs = _LimitInputs(
        person=person,
        campaign=candidates["campaign_id"].to_numpy(dtype=object),
        when=candidates["time_gmt"].to_numpy(dtype=float),
        dedupe=candidates["campaign_id"].map(dedupe_of).to_numpy(dtype=float),
        waiting=~candidates["campaign_id"].isin(enabled_campaigns(rules)).to_numpy(dtype=bool),
        past_person=past_person,
        past=past,
        per_recipient=per_recipient,
    )
    several = np.bincount(person, minlength=codes.max() + 1)[person] > 1
    single = np.flatnonzero(~several)
    if len(past) and len(single):
        _limit_alone(inputs, single, reasons)
    scan = np.flatnonzero(several)
    if len(scan):
        _limit_in_order(inputs, scan, reasons)
    return objects(reasons, candidates.index)


def _limit_alone(inputs: _LimitInputs, single: np.ndarray, reasons: np.ndarray) -> None:
    """Candidates alone of their person in the batch: compared with the history, all at once."""
    pairs = pd.DataFrame({"row": single, "person": inputs.person[single]}).merge(inputs.past, on="person")
    rows = pairs["row"].to_numpy()
    apart = np.abs(inputs.when[rows] - pairs["past_time"].to_numpy())
    same = pairs["past_campaign"].to_numpy(dtype=object) == inputs.campaign[rows]
    deduped = np.unique(rows[same & (apart < inputs.dedupe[rows])])
    reasons[deduped] = "dedupe"
    if inputs.per_recipient:
        cap_max, cap_per = inputs.per_recipient
        counted = (apart < cap_per) & ~pairs["past_waiting"].to_numpy(dtype=bool)
        near = np.bincount(rows[counted], minlength=len(inputs.person))
        capped = np.flatnonzero(near >= cap_max)
        reasons[capped[pd.isna(reasons[capped])]] = "frequency_cap"


def _limit_in_order(inputs: _LimitInputs, scan: np.ndarray, reasons: np.ndarray) -> None:
    """Candidates of people with several in the batch: a scan in decision order, the history
    counted as kept first."""
    cap_max, cap_per = inputs.per_recipient if inputs.per_recipient else (0, 0.0)
    kept: dict[int, list[tuple[str, float, bool]]] = {}  # campaign, time, waiting
    relevant = np.isin(inputs.past_person, inputs.person[scan])
    for who, what, at, waiting in zip(
        inputs.past_person[relevant].tolist(),
        inputs.past["past_campaign"].to_numpy()[relevant].tolist(),
        inputs.past["past_time"].to_numpy()[relevant].tolist(),
        inputs.past["past_waiting"].to_numpy()[relevant].tolist(),
        strict=True,
    ):
        kept.setdefault(who, []).append((what, at, waiting))
    for row in scan.tolist():
        mine = kept.setdefault(int(inputs.person[row]), [])
        at, what, window = inputs.when[row], inputs.campaign[row], inputs.dedupe[row]
        if window and any(c == what and abs(t - at) < window for c, t, _ in mine):
            reasons[row] = "dedupe"
        elif inputs.per_recipient and sum(abs(t - at) < cap_per and not w for _, t, w in mine) >= cap_max:
            reasons[row] = "frequency_cap"
        else:
            mine.append((what, at, bool(inputs.waiting[row])))


# --- a batch's decisions ----------------------------------------------------------------------


def screen(
    candidates: pd.DataFrame,
    recipients: pd.DataFrame | Audience,
    cancelling: pd.DataFrame,
    rules: Sequence[Rule],
    suppressions: SuppressionLookup | None = None,
) -> pd.DataFrame:
    """The candidates of a batch (``expand_candidates``) with their recipient and the audience
    (and suppression, given ``suppressions``) and ``unless`` reasons."""
    candidates = attach_recipients(candidates, recipients, rules)
    if suppressions is not None:
        attach_suppressions(candidates, suppressions)
    reasons = audience_reasons(candidates)
    open_rows = reasons.isna().to_numpy()
    reasons[open_rows] = cancellations(candidates[open_rows], cancelling, rules).to_numpy()
    candidates["reason"] = reasons
    return candidates


def finish(
    candidates: pd.DataFrame, history: pd.DataFrame, config: TriggersConfig, rules: Sequence[Rule]
) -> pd.DataFrame:
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
            "status": objects(np.where(reasons.isna().to_numpy(), "pending", "suppressed")),
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
    return finish(
        screen(expand_candidates(events, rules), recipients, cancelling, rules), history, config, rules
    )
