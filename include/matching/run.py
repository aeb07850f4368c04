"""A matching run: every ready staged event decided, in time order and bounded batches.

Determinism: events are decided in (time, event id) order and every earlier decision is read
back from ``deliveries`` (a run keeps its own in memory: a batch is committed by a writer
process while the next one is decided), so one run over a set of closed events and any
sequence of runs that sees them in time order (backfill intervals in order; scheduled runs when
the matched triggers share one ``unless`` window) write the same rows. When campaigns hold their
events for different windows, a later event of a shorter-held campaign can be decided first; the
window checks then also count that later decision, so the dedupe and frequency guarantees still
hold (the earlier event is the one suppressed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine

from include.config import TriggersConfig
from include.database.locks import run_lock
from include.matching.decisions import HISTORY_COLUMNS, WAITING, enabled_campaigns, finish, no_history, screen
from include.matching.reading import (
    AudienceReader,
    ReadySelection,
    advance_frontier,
    read_cancelling,
    read_frontier,
    read_history,
    read_ready_events,
)
from include.matching.rules import Rule, compile_rules, expand_candidates, limit_window
from include.matching.writer import BatchWriter
from include.runtime import collector_paused, progress_logged
from include.staging.backlog import events_to_match
from include.suppressions.store import reasons_for

log = logging.getLogger(__name__)
FIRST_BATCH_EVENTS = 50_000


class RunDecisions:
    """The live decisions of one matching run, for the dedupe and frequency checks of its later
    batches: those may not be committed yet when the next batch is decided."""

    def __init__(self, decided_at: float) -> None:
        self.decided_at = decided_at  # every decision of the run carries it
        self.parts: list[pd.DataFrame] = []

    def add(self, decisions: pd.DataFrame) -> None:
        live = (decisions["status"] == "pending").to_numpy(dtype=bool)
        self.parts.append(
            pd.DataFrame(
                {c: decisions[c].to_numpy()[live] for c in HISTORY_COLUMNS}
            )  # not every column's take
        )

    def history(
        self, recipient_ids: np.ndarray, start: float, end: float, enabled: frozenset[str]
    ) -> pd.DataFrame:
        """The run's pending decisions; ``waiting`` where the campaign is not in ``enabled``."""
        if not self.parts:
            return no_history()
        if len(self.parts) > 1:
            self.parts = [pd.concat(self.parts, ignore_index=True)]
        known = self.parts[0]
        times = known["event_time"].to_numpy(dtype=float)
        keep = (
            (times >= start) & (times <= end) & known["recipient_id"].isin(recipient_ids).to_numpy(dtype=bool)
        )
        found = known[keep].copy()
        found[WAITING] = ~found["campaign_id"].isin(enabled).to_numpy(dtype=bool)
        return found


@dataclass(frozen=True)
class BatchContext:
    """What deciding a batch reads besides its events: the configuration and its rules, the
    run's audience reader and the run's decisions so far."""

    config: TriggersConfig
    rules: Sequence[Rule]
    reader: AudienceReader
    run: RunDecisions


def decide_batch(conn: Connection, context: BatchContext, events: pd.DataFrame) -> pd.DataFrame:
    """Decide a batch of events, reading the audience, cancelling events and history in ``conn``."""
    config, rules = context.config, context.rules
    candidates = expand_candidates(events, rules)
    lookups: dict[str, set[str]] = {}
    column_of_rule = {rule.index: rule.column for rule in rules}
    for index, identities in candidates.groupby("rule")["identity"]:
        lookups.setdefault(column_of_rule[int(index)], set()).update(v for v in identities.tolist() if v)
    audience = context.reader.for_batch(conn, lookups)
    times = events["time_gmt"].to_numpy(dtype=float)
    start, end = float(times.min()), float(times.max())
    max_hold = max([rule.hold for rule in rules], default=0.0)
    cancelling = read_cancelling(conn, config, rules, start, end + max_hold)
    screened = screen(candidates, audience, cancelling, rules, lambda emails: reasons_for(conn, emails))
    window = limit_window(config, rules)
    history = no_history()
    if window:
        open_people = screened.loc[screened["reason"].isna().to_numpy(), "recipient_id"].unique()
        bounds = (start - window, end + window)
        enabled = enabled_campaigns(rules)
        earlier_runs = read_history(
            conn, open_people.tolist(), *bounds, not_decided_at=context.run.decided_at, enabled=enabled
        )
        if len(earlier_runs):  # a decision already taken for one of these events is not history
            earlier_runs = earlier_runs[
                ~earlier_runs["event_id"].isin(events["event_id"]).to_numpy(dtype=bool)
            ]
        this_run = context.run.history(open_people, *bounds, enabled)
        history = pd.concat([earlier_runs, this_run], ignore_index=True)
    return finish(screened, history, config, rules)


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
    Returns counts (a JSON-able dict for XCom): ready, matched, unmatched, pending,
    suppressed_<reason>...

    Holds the "matching" run lock throughout: an overlapping run (a backfill beside the
    schedule, a manual run) waits, then finds these events decided. Without it each run would
    miss the other's uncommitted decisions, or count them twice.
    """
    rules = compile_rules(config)
    with run_lock(engine, "matching"):
        context = BatchContext(config, rules, AudienceReader(rules), RunDecisions(decided_at=time.time()))
        with engine.connect() as conn:
            frontier = read_frontier(conn)
        selection = ReadySelection(rules, frontier, now, interval)
        counts = _decide_in_batches(engine, context, selection, batch_size)
        if interval is None:  # every ready journal event is decided and committed
            with engine.begin() as conn:
                advance_frontier(conn, rules, frontier, now)
    return counts


def _decide_in_batches(
    engine: Engine, context: BatchContext, selection: ReadySelection, batch_size: int
) -> dict[str, int]:
    """Read, decide and hand to the writer each batch of ready events until none is left."""
    counts: dict[str, int] = {"ready": 0, "matched": 0, "unmatched": 0, "pending": 0}
    after: tuple[float, str] | None = None
    writer = BatchWriter(engine)
    try:
        # collector paused: the batches' row tuples are garbage only when dropped
        # what remains: the events waiting when the run started (read once), less those decided
        total = events_to_match(engine, selection.interval)
        with (
            collector_paused(),
            progress_logged(log, "match", "events", lambda: counts["ready"], total=total),
        ):
            while True:
                with engine.connect() as conn:
                    # a smaller first batch: the writer starts sooner, and it is the slower side
                    limit = batch_size if after is not None else min(batch_size, FIRST_BATCH_EVENTS)
                    events = read_ready_events(conn, context.config, selection, limit=limit, after=after)
                    if events.empty:
                        break
                    decisions = decide_batch(conn, context, events)
                writer.submit(events, decisions, context.run.decided_at, full=len(events) == limit)
                context.run.add(decisions)
                after = (float(events["time_gmt"].iat[-1]), str(events["event_id"].iat[-1]))
                _count(counts, events, decisions)
                if len(events) < limit:
                    break
    finally:
        writer.close()
    return counts


def _count(counts: dict[str, int], events: pd.DataFrame, decisions: pd.DataFrame) -> None:
    matched = decisions["event_id"].nunique()
    counts["ready"] += len(events)
    counts["matched"] += matched
    counts["unmatched"] += len(events) - matched
    counts["pending"] += int((decisions["status"] == "pending").sum())
    for reason, number in decisions["reason"].dropna().value_counts().items():
        counts[f"suppressed_{reason}"] = counts.get(f"suppressed_{reason}", 0) + int(number)
