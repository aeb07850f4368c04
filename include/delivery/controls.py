"""What holds a pending email back at send time (SPEC section 9): its campaign switched off or
removed, its age, its recipient's quiet hours.

* A campaign with ``enabled: false``, or gone from the configuration, is not selected: its
  pending emails wait, nothing is suppressed, and each run reports them
  (:func:`waiting_by_campaign`). ``python -m include.cli campaigns cancel --campaign C``
  suppresses them explicitly (``cancelled``, :func:`cancel_pending`).
* ``max_age``: an email whose triggering event is older is suppressed ``expired``.
* ``send_window`` (the campaign's, else ``limits.send_window``), in the recipient's
  ``timezone`` (else ``limits.default_timezone``, else UTC): an email due outside it stays
  ``pending`` with ``not_before`` = the next opening, and is not selected before then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, text

from include.config import Campaign, TriggersConfig
from include.database.hourly import SUPPRESSED, add_counts
from include.database.sql import in_list, list_param
from include.delivery.windows import UTC_ZONE, Window, next_opening, parse_window, zone_or_default
from include.errors import ConfigError

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
EXPIRED = "expired"


def enabled_campaign_ids(config: TriggersConfig) -> list[str]:
    return [c.id for c in config.campaigns if c.enabled]


def due_scope(bind: Connection | Engine, config: TriggersConfig, now: float) -> tuple[str, dict[str, Any]]:
    """SQL (``AND ...`` on ``deliveries d``) and its parameters: rows of enabled campaigns whose
    ``not_before`` has passed. The delivery run neither selects nor waits for the others."""
    sql = f" AND {in_list(bind, 'd.campaign_id', 'enabled_campaigns')} AND (d.not_before IS NULL OR d.not_before <= :due_now)"
    return sql, {"enabled_campaigns": list_param(bind, enabled_campaign_ids(config)), "due_now": now}


@dataclass
class SendTimeHolds:
    """The rows of a batch that may not go now: ``expired`` ids and ``held`` id -> not_before."""

    expired: set[str] = field(default_factory=set)
    held: dict[str, float] = field(default_factory=dict)


class SendTimeRules:
    """The campaigns' ``max_age`` and ``send_window``, compiled once per run."""

    def __init__(self, config: TriggersConfig) -> None:
        default_window = config.limits.send_window
        self.max_age = {c.id: c.max_age for c in config.campaigns if c.max_age}
        self.windows: dict[str, Window] = {
            c.id: parse_window(c.send_window or default_window)
            for c in config.campaigns
            if c.send_window or default_window
        }
        default_zone = config.limits.default_timezone
        self.default_zone = ZoneInfo(default_zone) if default_zone else UTC_ZONE
        self._zones: dict[str | None, ZoneInfo] = {}

    def zone(self, name: str | None) -> ZoneInfo:
        found = self._zones.get(name)
        if found is None:
            found = self._zones[name] = zone_or_default(name, self.default_zone)
        return found

    def holds(self, rows: list[Mapping[str, Any]], now: float) -> SendTimeHolds:
        """Which rows are too old (``expired``) and which wait for their window (``held``).
        ``rows`` have delivery_id, campaign_id, event_time and r_timezone (the recipient's)."""
        found = SendTimeHolds()
        if not self.max_age and not self.windows:
            return found
        for row in rows:
            campaign_id, delivery_id = row["campaign_id"], row["delivery_id"]
            max_age = self.max_age.get(campaign_id)
            if (
                max_age is not None
                and row["event_time"] is not None
                and now - float(row["event_time"]) > max_age
            ):
                found.expired.add(delivery_id)
                continue
            window = self.windows.get(campaign_id)
            if window is not None:
                opening = next_opening(window, self.zone(row.get("r_timezone")), now)
                if opening is not None:
                    found.held[delivery_id] = opening
        return found


def waiting_by_campaign(conn: Connection, config: TriggersConfig) -> dict[str, dict[str, Any]]:
    """Every campaign (configured or with pending emails): its state (``enabled``, ``disabled``,
    ``removed``) and its pending emails, of which ``held_until_window`` wait for a send window."""
    rows = conn.execute(
        text(
            "SELECT campaign_id, count(*), "
            "sum(CASE WHEN not_before IS NOT NULL AND not_before > :now THEN 1 ELSE 0 END) "
            "FROM deliveries WHERE status = 'pending' GROUP BY campaign_id"
        ),
        {"now": time.time()},
    ).all()
    found: dict[str, dict[str, Any]] = {
        c.id: {"state": "enabled" if c.enabled else "disabled", "pending": 0, "held_until_window": 0}
        for c in config.campaigns
    }
    for campaign_id, pending, held in rows:
        entry = found.setdefault(str(campaign_id), {"state": "removed", "pending": 0, "held_until_window": 0})
        entry["pending"], entry["held_until_window"] = int(pending), int(held or 0)
    return found


def waiting_counts(waiting: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The run counts of the emails that wait for a switched-off or removed campaign."""
    counts = {"waiting_disabled": 0, "waiting_removed_campaign": 0}
    for entry in waiting.values():
        if entry["state"] == "disabled":
            counts["waiting_disabled"] += entry["pending"]
        elif entry["state"] == "removed":
            counts["waiting_removed_campaign"] += entry["pending"]
    return {key: value for key, value in counts.items() if value}


def cancel_pending(engine: Engine, config: TriggersConfig, campaign_id: str) -> int:
    """Suppress (``cancelled``) every pending email of a removed or disabled campaign; how many.

    An enabled campaign is refused: its emails are being sent, switch it off first.
    """
    campaign = _campaign(config, campaign_id)
    if campaign is not None and campaign.enabled:
        raise ConfigError(
            f"campaign {campaign_id!r} is enabled: set 'enabled: false' on it in the configuration "
            "before cancelling its pending emails"
        )
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "UPDATE deliveries SET status = 'suppressed', reason = :reason "
                "WHERE campaign_id = :campaign AND status = 'pending'"
            ),
            {"reason": CANCELLED, "campaign": campaign_id},
        )
        cancelled = int(result.rowcount or 0)
        add_counts(conn, time.time(), {(campaign_id, f"{SUPPRESSED}{CANCELLED}"): cancelled})
    if campaign is None and cancelled == 0:  # most likely a typo: say so rather than "0 cancelled"
        raise ConfigError(
            f"no campaign {campaign_id!r} in the configuration and no pending email of it; "
            "'python -m include.cli campaigns list' shows the campaign ids"
        )
    return cancelled


def _campaign(config: TriggersConfig, campaign_id: str) -> Campaign | None:
    return next((c for c in config.campaigns if c.id == campaign_id), None)


def report_waiting(engine: Engine, config: TriggersConfig) -> dict[str, int]:
    """Log the campaigns whose pending emails wait (switched off, removed) with the command that
    cancels them; their counts, for the run's record."""
    with engine.connect() as conn:
        waiting = waiting_by_campaign(conn, config)
    for campaign_id, entry in sorted(waiting.items()):
        if entry["state"] != "enabled" and entry["pending"]:
            log.warning(
                "campaign %r is %s: %d pending email(s) wait (switch it on, or cancel them with "
                "'python -m include.cli campaigns cancel --campaign %s')",
                campaign_id,
                "switched off" if entry["state"] == "disabled" else "not in the configuration",
                entry["pending"],
                campaign_id,
            )
    return waiting_counts(waiting)
