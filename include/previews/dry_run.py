"""A dry run (``python -m include.cli dry-run``, DAG param ``dry_run``): what a run would decide,
send and suppress, and why, per campaign, with a few rendered samples in the log.

It decides the ready events as matching does (the same reads and :func:`decide_batch`, its
decisions kept in memory), selects the due pending emails as delivery does
(:meth:`Producer.due_rows`), and applies the send-time checks (send window, ``max_age``,
eligibility) and delivery's renderer to both. Nothing is written to ``deliveries``, no event
changes status, no lock is taken and nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from include.config import TriggersConfig
from include.delivery.claims import Producer
from include.delivery.controls import SendTimeRules, enabled_campaign_ids, waiting_by_campaign
from include.delivery.eligibility import recheck_eligibility
from include.delivery.options import DeliveryOptions
from include.delivery.render import RenderedEmail
from include.delivery.render_pool import Row
from include.delivery.run import delivery_renderer
from include.delivery.state import RunState
from include.matching.reading import AudienceReader, ReadySelection, read_frontier, read_ready_events
from include.matching.rules import compile_rules
from include.matching.run import BatchContext, RunDecisions, decide_batch
from include.previews.rows import decision_rows

log = logging.getLogger(__name__)
BATCH_EVENTS = 50_000


def decide_without_writing(
    engine: Engine, config: TriggersConfig, now: float, interval: tuple[float, float] | None
) -> tuple[int, pd.DataFrame]:
    """The ready events' count and their decisions, as a matching run would take them."""
    rules = compile_rules(config)
    context = BatchContext(config, rules, AudienceReader(rules), RunDecisions(decided_at=time.time()))
    parts, ready, after = [], 0, None
    with engine.connect() as conn:
        selection = ReadySelection(rules, read_frontier(conn), now, interval)
        while True:
            events = read_ready_events(conn, config, selection, limit=BATCH_EVENTS, after=after)
            if events.empty:
                break
            decisions = decide_batch(conn, context, events)
            context.run.add(decisions)
            parts.append(decisions)
            ready += len(events)
            after = (float(events["time_gmt"].iat[-1]), str(events["event_id"].iat[-1]))
            if len(events) < BATCH_EVENTS:
                break
    return ready, (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())


def dry_run(
    engine: Engine,
    config: TriggersConfig,
    templates_dir: str | Path,
    *,
    now: float | None = None,
    interval: tuple[float, float] | None = None,
    samples: int = 2,
    max_messages: int | None = None,
) -> dict[str, Any]:
    """Per campaign: would_send, suppressed (reason -> n, at decision or at send time),
    held_send_window, waiting (its campaign switched off or removed), render_failed, and its
    state (enabled, disabled, removed). Writes and sends nothing."""
    now = time.time() if now is None else now
    ready, decisions = decide_without_writing(engine, config, now, interval)
    report: dict[str, dict[str, Any]] = {c.id: _empty() for c in config.campaigns}
    new_pending = pd.DataFrame()
    if not decisions.empty:
        for (campaign, reason), number in decisions.groupby(["campaign_id", "reason"]).size().items():
            _entry(report, campaign)["suppressed"][reason] += int(number)
        new_pending = decisions[decisions["status"] == "pending"]
    renderer = delivery_renderer(engine, config, templates_dir)
    options = DeliveryOptions(templates_dir, "dry-run", now=now, interval=interval)
    producer = Producer(engine, config, RunState(options, "dry-run"), renderer)
    with engine.connect() as conn:
        rows = producer.due_rows(max_messages or 100_000) + decision_rows(conn, new_pending)
        rows = _send_time(conn, config, rows, now, report)
        for campaign_id, waiting in waiting_by_campaign(conn, config).items():
            _entry(report, campaign_id)["state"] = waiting["state"]
            if waiting["state"] != "enabled":  # delivery does not select them: they wait
                _entry(report, campaign_id)["waiting"] += waiting["pending"]
    rendered = renderer.row_renderer.render_rows(rows)
    shown: Counter[str] = Counter()
    would_send = 0
    for row, outcome in zip(rows, rendered, strict=True):
        entry = _entry(report, row["campaign_id"])
        if isinstance(outcome, RenderedEmail) and (max_messages is None or would_send < max_messages):
            entry["would_send"] += 1
            would_send += 1
            if shown[row["campaign_id"]] < samples:
                shown[row["campaign_id"]] += 1
                log.info("dry run sample of %s:\n%s", row["campaign_id"], describe(outcome.data))
        elif isinstance(outcome, tuple) and outcome[0] == "invalid_email":
            entry["suppressed"]["invalid_email"] += 1
        elif isinstance(outcome, tuple):
            entry["render_failed"] += 1
            log.warning("dry run: %s would fail: %s: %s", row["delivery_id"], *outcome)
    result = {
        "dry_run": True,
        "events_ready": ready,
        "campaigns": {cid: {**e, "suppressed": dict(e["suppressed"])} for cid, e in report.items()},
    }
    log.info("dry run (nothing written, nothing sent): %s", json.dumps(result, sort_keys=True))
    return result


def _send_time(
    conn: Any, config: TriggersConfig, rows: list[Row], now: float, report: dict[str, dict[str, Any]]
) -> list[Row]:
    """The rows that pass the send-time checks; the others counted in ``report``."""
    enabled = set(enabled_campaign_ids(config))
    for row in rows:
        if row["campaign_id"] not in enabled:
            _entry(report, row["campaign_id"])["waiting"] += 1
    rows = [row for row in rows if row["campaign_id"] in enabled]
    holds = SendTimeRules(config).holds(rows, now)
    for row in rows:
        if row["delivery_id"] in holds.expired:
            _entry(report, row["campaign_id"])["suppressed"]["expired"] += 1
        elif row["delivery_id"] in holds.held:
            _entry(report, row["campaign_id"])["held_send_window"] += 1
    rows = [r for r in rows if r["delivery_id"] not in holds.expired and r["delivery_id"] not in holds.held]
    kept = []
    for row, reason in zip(rows, recheck_eligibility(conn, config, rows), strict=True):
        if reason is None:
            kept.append(row)
        else:
            _entry(report, row["campaign_id"])["suppressed"][reason] += 1
    return kept


def _empty() -> dict[str, Any]:
    return {
        "would_send": 0,
        "suppressed": Counter(),
        "held_send_window": 0,
        "waiting": 0,
        "render_failed": 0,
    }


def _entry(report: dict[str, dict[str, Any]], campaign_id: str) -> dict[str, Any]:
    return report.setdefault(str(campaign_id), _empty())


def describe(data: bytes, lines: int = 12) -> str:
    """A rendered sample for the log: its addresses, subject and the first lines of its text."""
    message = message_from_bytes(data, policy=email_policy.default)
    body = message.get_body(("plain",))
    text = body.get_content() if body is not None else ""  # type: ignore[union-attr]
    head = [f"  {name}: {message[name]}" for name in ("From", "To", "Subject")]
    return "\n".join(head + ["  | " + line for line in text.splitlines()[:lines]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=2, help="rendered samples logged per campaign")
    parser.add_argument("--max-messages", type=int, default=None, help="as a run capped at this many")


def main(args: argparse.Namespace) -> int:
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with open_resources() as res:
        report = dry_run(
            res.engine,
            res.config,
            res.settings.templates_dir,
            samples=args.samples,
            max_messages=args.max_messages,
        )
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
