"""Delivery rows for the previews, in the shape delivery's batch query gives them: the decision's
columns, its recipient's (``r_*``) and its event's (``e_trigger_id``, ``e_payload``).

From decisions not written (a dry run's), or for one campaign, recipient and event (a preview),
staged or a sample built from the campaign's trigger and ``where`` conditions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pandas as pd
from sqlalchemy import Connection, text

from include.config import WILDCARD, Campaign, Condition, TriggersConfig
from include.database.sql import in_list, list_param
from include.delivery.render import RenderedEmail
from include.delivery.render_pool import RECIPIENT_COLUMNS, Row, RowRenderer
from include.errors import PreviewError
from include.matching.decisions import delivery_ids

SAMPLE_EVENT_ID = "sample"


def campaign_of(config: TriggersConfig, campaign_id: str) -> Campaign:
    found = next((c for c in config.campaigns if c.id == campaign_id), None)
    if found is None:
        known = ", ".join(c.id for c in config.campaigns) or "none"
        raise PreviewError(
            f"no campaign {campaign_id!r} in the configuration; pass --campaign one of: {known}"
        )
    return found


def recipient_of(
    conn: Connection, recipient_id: str | None = None, email: str | None = None
) -> dict[str, Any]:
    """The recipient's row by id, or by address (case-insensitive); PreviewError naming the fix."""
    columns = ", ".join(f'"{c}"' for c in RECIPIENT_COLUMNS)
    if recipient_id is not None:
        row = conn.execute(
            text(f"SELECT {columns} FROM recipients WHERE recipient_id = :v"), {"v": recipient_id}
        )
    else:
        row = conn.execute(
            text(f"SELECT {columns} FROM recipients WHERE lower(email) = :v ORDER BY recipient_id"),
            {"v": (email or "").strip().lower()},
        )
    found = row.mappings().first()
    if found is None:
        given = f"recipient_id {recipient_id!r}" if recipient_id is not None else f"email {email!r}"
        raise PreviewError(
            f"no recipient with {given} in recipients; load it with 'audience load FILE.csv' or pass "
            "another --recipient/--email"
        )
    return dict(found)


def staged_event(conn: Connection, event_id: str) -> dict[str, Any]:
    row = (
        conn.execute(
            text("SELECT event_id, trigger_id, time_gmt, payload FROM pipeline_events WHERE event_id = :id"),
            {"id": event_id},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise PreviewError(
            f"no staged event {event_id!r} (never staged, or purged after the retention); pass another "
            "--event or --sample"
        )
    return dict(row)


def latest_decided_event(conn: Connection, campaign_id: str, recipient_id: str) -> dict[str, Any] | None:
    """The staged event of the recipient's latest decision for the campaign, if still staged."""
    row = (
        conn.execute(
            text(
                "SELECT e.event_id, e.trigger_id, e.time_gmt, e.payload FROM deliveries d "
                "JOIN pipeline_events e ON e.event_id = d.event_id "
                "WHERE d.campaign_id = :c AND d.recipient_id = :r ORDER BY d.event_time DESC LIMIT 1"
            ),
            {"c": campaign_id, "r": recipient_id},
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def event_for(
    conn: Connection,
    config: TriggersConfig,
    campaign: Campaign,
    recipient: Mapping[str, Any],
    event_id: str | None,
    now: float,
    sample: bool = False,
) -> tuple[dict[str, Any], str]:
    """The event a preview or a proof is built from, and which it is: the staged ``event_id``,
    else the recipient's latest decided event (unless ``sample``), else a sample event."""
    event = None
    if event_id is not None:
        event = staged_event(conn, event_id)
    elif not sample:
        event = latest_decided_event(conn, campaign.id, recipient["recipient_id"])
    if event is not None:
        return event, f"staged event {event['event_id']}"
    return sample_event(config, campaign, recipient, now), "a sample event"


def _sample_value(condition: Condition) -> Any:
    """A value for which ``condition`` holds."""
    value = condition.value
    if condition.op == "in":
        return value[0]
    if condition.op in ("gt", "lt"):
        return float(value) + (1 if condition.op == "gt" else -1)
    if condition.op == "ne":
        return f"not-{value}"
    if condition.op == "exists":
        return "sample"
    return value  # eq, ge, le, startswith, contains: the value itself


def sample_event(
    config: TriggersConfig, campaign: Campaign, recipient: Mapping[str, Any], now: float
) -> dict[str, Any]:
    """An event of the campaign's trigger that its ``where`` conditions accept, naming the recipient
    the way the campaign's identity reads it (SPEC section 3's payload shape)."""
    trigger_ids = [t for t in config.trigger_ids_for(campaign.trigger) if t != WILDCARD]
    dimensions: dict[str, list[Any]] = {c.dimension.strip(): [_sample_value(c)] for c in campaign.where}
    identity = campaign.identity
    person = recipient.get(identity.column)
    if identity.dimension:
        dimensions[identity.dimension.strip()] = [person]
    payload = {
        "triggerId": trigger_ids[0] if trigger_ids else campaign.trigger,
        "timeGMT": int(now),
        "mcId": person if identity.field == "mcId" else recipient.get("mc_id"),
        "enrichments": {
            "analyticsHitSummary": {
                "dimensions": {
                    name: {"type": "string", "data": values, "name": name, "source": "sample"}
                    for name, values in dimensions.items()
                }
            }
        },
    }
    return {
        "event_id": SAMPLE_EVENT_ID,
        "trigger_id": payload["triggerId"],
        "time_gmt": float(int(now)),
        "payload": json.dumps(payload),
    }


def preview_row(
    campaign_id: str, recipient: Mapping[str, Any], event: Mapping[str, Any], email: str | None = None
) -> Row:
    """The row delivery would render for this decision (its delivery_id as matching hashes it)."""
    delivery_id = delivery_ids(
        pd.Series([campaign_id]), pd.Series([recipient["recipient_id"]]), pd.Series([event["event_id"]])
    )[0]
    row: Row = {
        "delivery_id": delivery_id,
        "campaign_id": campaign_id,
        "recipient_id": recipient["recipient_id"],
        "email": email or recipient["email"],
        "event_id": event["event_id"],
        "event_time": float(event["time_gmt"]),
        "attempts": 0,
        "e_trigger_id": event["trigger_id"],
        "e_payload": event["payload"],
    }
    row.update({f"r_{c}": recipient.get(c) for c in RECIPIENT_COLUMNS})
    return row


def decision_rows(conn: Connection, decisions: pd.DataFrame) -> list[Row]:
    """Delivery rows for pending decisions not written (campaign_id, recipient_id, email,
    event_id, event_time): their recipients and events read in two queries."""
    if decisions.empty:
        return []
    recipient_ids = sorted({str(r) for r in decisions["recipient_id"].tolist() if r})
    event_ids = sorted({str(e) for e in decisions["event_id"].tolist()})
    columns = ", ".join(f'"{c}"' for c in RECIPIENT_COLUMNS)
    people = {
        row["recipient_id"]: dict(row)
        for row in conn.execute(
            text(f"SELECT {columns} FROM recipients WHERE {in_list(conn, 'recipient_id', 'ids')}"),
            {"ids": list_param(conn, recipient_ids)},
        ).mappings()
    }
    events = {
        row["event_id"]: dict(row)
        for row in conn.execute(
            text(
                f"SELECT event_id, trigger_id, time_gmt, payload FROM pipeline_events WHERE {in_list(conn, 'event_id', 'ids')}"
            ),
            {"ids": list_param(conn, event_ids)},
        ).mappings()
    }
    rows = []
    for decision in decisions.to_dict("records"):
        recipient = people.get(
            decision["recipient_id"], {"recipient_id": decision["recipient_id"], "email": None}
        )
        event = events.get(decision["event_id"]) or {  # purged: what delivery's LEFT JOIN gives
            "event_id": decision["event_id"],
            "trigger_id": None,
            "time_gmt": decision["event_time"],
            "payload": None,
        }
        rows.append(preview_row(decision["campaign_id"], recipient, event, decision["email"]))
        if decision["recipient_id"] not in people:
            rows[-1]["r_recipient_id"] = None  # as delivery's LEFT JOIN gives it: unknown_recipient
    return rows


def render_one(renderer: RowRenderer, row: Row) -> RenderedEmail:
    """The message of ``row``; why delivery would not send it as PreviewError."""
    outcome = renderer.render_rows([row])[0]
    if isinstance(outcome, tuple):
        reason, detail = outcome
        raise PreviewError(
            f"delivery would not send this email ({reason}: {detail or row['email']!r}); fix the "
            "template named, or the recipient's address"
        )
    return outcome
