"""Send-time eligibility, in one place (SPEC section 7): may a decided email still go out?

Delivery asks this right before it claims a row: the person may have opted out, the cancelling
event may have arrived, the campaign may be gone. It reuses matching's rules and reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection

from include.config import TriggersConfig, dimension_column
from include.database.sql import in_list, list_param
from include.matching.decisions import Audience, attach_suppressions, audience_reasons, cancellations
from include.matching.reading import quoted, read_cancelling, read_frame, read_recipients
from include.matching.rules import Rule, compile_rules, person_columns
from include.matching.values import objects, text_column
from include.suppressions.store import reasons_for

_TRUE = {"1", "true", "yes", "on"}


def _flag(value: Any) -> bool:
    return value.strip().lower() in _TRUE if isinstance(value, str) else bool(value)


def still_eligible(conn: Connection, config: TriggersConfig, pending: pd.DataFrame) -> pd.Series:
    """At send time: None where a decision still holds, else why not (SPEC section 7).

    ``pending`` has delivery_id, campaign_id, recipient_id, event_id, event_time (and the
    recorded ``email``, checked against the suppressions, else the recipient's). Reasons:
    ``unknown_campaign`` (removed from the configuration), ``unknown_recipient``, ``opted_out``,
    a suppression's reason (``unsubscribed``, ``hard_bounce``...), ``no_email``,
    ``invalid_email`` (as they are now), ``cancelled_by:<trigger>`` (the cancelling event
    arrived after the decision). Three to four queries per call, whatever its size.
    """
    reasons = objects(np.full(len(pending), None, dtype=object), pending.index)
    if pending.empty:
        return reasons
    rules = compile_rules(config)
    known = pending["campaign_id"].isin({rule.id for rule in rules}).to_numpy(dtype=bool)
    reasons[~known] = "unknown_campaign"
    rows = pending[known]
    if rows.empty:
        return reasons
    candidates = _candidates(conn, rules, rows)
    # the address the email goes to is the one its decision recorded, when given
    sent_to = rows["email"].where(rows["email"].notna(), candidates["email"]) if "email" in rows else None
    addressed = candidates[["recipient_id", "campaign_id", "email"]].copy()
    if sent_to is not None:
        addressed["email"] = objects(sent_to.to_numpy(dtype=object), addressed.index)
    attach_suppressions(addressed, lambda emails: reasons_for(conn, emails))
    candidates["suppression"] = addressed["suppression"]
    audience_reason = audience_reasons(candidates)
    reasons.loc[rows.index] = audience_reason.to_numpy()
    with_unless = [r.index for r in rules if r.unless_label]
    open_rows = candidates[
        audience_reason.isna().to_numpy() & candidates["rule"].isin(with_unless).to_numpy()
    ].copy()
    if open_rows.empty:
        return reasons
    _read_match_values(conn, config, rules, open_rows)
    max_hold = max(rule.hold for rule in rules)
    times = open_rows["time_gmt"].to_numpy(dtype=float)
    cancelling = read_cancelling(conn, config, rules, float(times.min()), float(times.max()) + max_hold)
    cancelled = cancellations(open_rows, cancelling, rules).dropna()
    reasons.loc[cancelled.index] = cancelled.to_numpy()
    return reasons


def _candidates(conn: Connection, rules: list[Rule], rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (of known campaigns) as matching's candidates, with their recipient as it is now."""
    rule_index = {rule.id: rule.index for rule in rules}
    recipient_ids = text_column(rows["recipient_id"])
    audience = Audience(read_recipients(conn, {"recipient_id": set(recipient_ids.tolist()) - {""}}, rules))
    ids = recipient_ids.to_numpy(dtype=object)
    found = audience.rows(np.where(ids == "", None, ids))
    index = rows.index
    candidates = pd.DataFrame(
        {
            "rule": rows["campaign_id"].map(rule_index).to_numpy(dtype=np.int64),
            "campaign_id": objects(rows["campaign_id"].to_numpy(dtype=object), index),
            "event_id": objects(rows["event_id"].to_numpy(dtype=object), index),
            "time_gmt": rows["event_time"].to_numpy(dtype=float),
            "identity": recipient_ids,
            "recipient_id": objects(found["recipient_id"].to_numpy(dtype=object), index),
            "email": objects(found["email"].to_numpy(dtype=object), index),
            "opted_out": found["opted_out"].fillna(False).to_numpy(dtype=bool),
            "match_values": objects([""] * len(rows), index),
        },
        index=index,
    )
    for column in person_columns(rules):
        candidates[f"person_{column}"] = objects(found[column].to_numpy(dtype=object), index)
    return candidates


def _read_match_values(
    conn: Connection, config: TriggersConfig, rules: list[Rule], open_rows: pd.DataFrame
) -> None:
    """Fill ``open_rows``' match_values from their events, for the rules that match on a dimension."""
    available = {dimension_column(d) for d in config.dimensions}
    in_use = set(open_rows["rule"])
    match_on = sorted({r.match_on for r in rules if r.match_on in available and r.index in in_use})
    if not match_on:
        return
    columns = ", ".join(map(quoted, match_on))
    sql = f"SELECT event_id, {columns} FROM pipeline_events WHERE {in_list(conn, 'event_id', 'ids')}"
    ids = list_param(conn, open_rows["event_id"].unique().tolist())
    origin = read_frame(conn, sql, {"ids": ids}, ["event_id", *match_on])
    origin = origin.drop_duplicates("event_id").set_index("event_id")
    for rule in rules:
        mine = (open_rows["rule"] == rule.index).to_numpy()
        if rule.match_on in match_on and mine.any():
            values = origin[rule.match_on].reindex(open_rows.loc[mine, "event_id"].to_numpy(dtype=object))
            open_rows.loc[mine, "match_values"] = text_column(values).to_numpy(dtype=object)


def recheck_eligibility(conn: Any, config: TriggersConfig, rows: list[Mapping[str, Any]]) -> list[str | None]:
    """For each row: None if it may still be sent, else the suppression reason.

    The decision is :func:`still_eligible` (opted out, cancelling event arrived,
    campaign removed...). The audience columns already read with the batch give a first answer
    that does not depend on it: no recipient row -> ``unknown_recipient``, opted out -> ``opted_out``.
    """
    reasons: list[str | None] = []
    for row in rows:
        if row["r_recipient_id"] is None:
            reasons.append("unknown_recipient")
        elif _flag(row["r_opted_out"]):
            reasons.append("opted_out")
        else:
            reasons.append(None)
    open_rows = [i for i, reason in enumerate(reasons) if reason is None]
    if open_rows:
        columns = ("delivery_id", "campaign_id", "recipient_id", "event_id", "event_time", "email")
        frame = pd.DataFrame({name: [rows[i].get(name) for i in open_rows] for name in columns})
        verdicts = still_eligible(conn, config, frame)
        for i, verdict in zip(open_rows, verdicts.tolist(), strict=True):
            if verdict is not None and not (isinstance(verdict, float) and verdict != verdict):
                reasons[i] = str(verdict)
    return reasons
