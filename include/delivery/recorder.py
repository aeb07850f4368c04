"""Recording what the relay answered, with group commit.

The recorder thread commits whatever results are waiting in one transaction: when idle every
message gets its own commit right after its 250; under load a commit covers the messages that
arrived during the previous one. A sender's window slot is freed only once its result is
committed, so a connection never has more than ``window`` messages acknowledged by the server
but not yet recorded. If the database stays down, the run stops: rows stay ``sending`` and a
later run requeues them (:mod:`include.delivery.recovery`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import Counter
from typing import Any

from sqlalchemy import Connection, Engine

from include.bounces.codes import is_hard_bounce_reply
from include.database.hourly import add_counts, hour_of, upsert_selected_sql
from include.database.sql import driver_sql, in_list, list_param
from include.delivery.options import RECORD_RETRY_SECONDS
from include.delivery.state import STOP, Result, RunState
from include.suppressions.store import EVERY_CAMPAIGN, Suppression, add

log = logging.getLogger(__name__)

RECORD_LINGER = 0.005  # seconds a result may wait for others to share its commit (window > 1)
MAX_GROUP = 5000  # results in one commit at most
_RECORDED = {  # what a row becomes, by what the recorder writes
    "sent": "status = 'sent', sent_at = :at, smtp_reply = :reply, reason = NULL",
    "failed": "status = 'failed', reason = :reason, smtp_reply = :reply",
    "retry": "status = 'pending', claimed_at = :at, smtp_reply = :reply, reason = 'retry: ' || :reply",
    "release": "status = 'pending', attempts = attempts - 1",  # never handed to the server: the claim did not count
}
_COUNTED = {"sent": "sent", "failed": "failed", "retry": "retried", "release": "released"}


class Recorder:
    """The recorder thread of one run (:meth:`run`), on a connection of its own."""

    def __init__(self, engine: Engine, state: RunState) -> None:
        self.engine = engine
        self.state = state
        self.max_attempts = state.options.max_attempts
        self.conn: Connection | None = None
        self.database_down = False
        # prepared once (SQLAlchemy's text() and compile cost ~100 µs a commit)
        self.sql = {
            outcome: driver_sql(
                engine,
                f"UPDATE deliveries SET {changes} "
                "WHERE delivery_id = :id AND status = 'sending' AND claimed_by = :token",
            )
            for outcome, changes in _RECORDED.items()
        }

    def run(self) -> None:
        """Commit results until STOP; a group of results lingers at most RECORD_LINGER."""
        results, group_ready, group = self.state.results, self.state.group_ready, self.state.group
        stop = False
        try:
            while not stop:
                batch = [results.get()]
                if group > 1 and batch[0] is not STOP:
                    group_ready.wait(RECORD_LINGER)  # never hold a result longer
                group_ready.clear()
                while len(batch) < MAX_GROUP and batch[-1] is not STOP:
                    try:
                        batch.append(results.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is STOP for item in batch)
                items = [item for item in batch if item is not STOP]
                if items:
                    self._commit(items)
        finally:
            if self.conn is not None:
                self.conn.close()

    def _commit(self, items: list[Result]) -> None:
        """Record ``items`` in one transaction, then free their window slots."""
        changes = {} if self.database_down else self._changes(items)
        hard_bounces = [] if self.database_down else _hard_bounces(items)
        recorded = self._write(changes, len(items), hard_bounces) if changes else {}
        for item in items:
            if item.done is not None:
                item.done.release()
        state = self.state
        with state.lock:
            state.outstanding -= len(items)
            if recorded:
                state.counts["hard_bounced"] += len(hard_bounces)
            for outcome, rows in recorded.items():
                state.counts[_COUNTED[outcome]] += rows
                # another run took the claim over (lease expired): its row is left alone
                state.counts["taken_over"] += len(changes[outcome]) - rows

    def _changes(self, items: list[Result]) -> dict[str, list[dict[str, Any]]]:
        """The parameters of each statement to run, in this order; none for an empty one."""
        sent, closed, retry, release = [], [], [], []
        token, max_attempts = self.state.run_token, self.max_attempts
        for item in items:
            job = item.job
            params = {"id": job.delivery_id, "token": token, "at": item.at, "reply": item.reply}
            params["campaign"] = job.campaign_id  # not in the statements: the counts per campaign
            if item.outcome == "sent":
                sent.append(params)
            elif item.outcome == "failed":
                closed.append({**params, "reason": "smtp_rejected"})
            elif item.outcome == "retry" and job.attempts >= max_attempts:
                closed.append({**params, "reason": f"gave up after {job.attempts} attempts"})
            elif item.outcome == "retry":
                retry.append(params)
            else:
                release.append(params)
        changes = {"sent": sent, "failed": closed, "retry": retry, "release": release}
        return {outcome: params for outcome, params in changes.items() if params}

    def _write(
        self, changes: dict[str, list[dict[str, Any]]], count: int, hard_bounces: list[Suppression]
    ) -> dict[str, int]:
        """One transaction, retried on a new connection; the rows each outcome changed (a row no
        longer claimed by this run is not); {} (and the run stopped) when the database does not
        come back: nothing else may be sent before it does. ``hard_bounces`` are suppressed in
        the same transaction as their failure."""
        for attempt in itertools.count():
            try:
                if self.conn is None:  # kept for the run: a checkout pings the database
                    self.conn = self.engine.connect()
                with self.conn.begin():
                    add(self.conn, hard_bounces)
                    recorded = {
                        outcome: self.conn.exec_driver_sql(self.sql[outcome], params).rowcount
                        for outcome, params in changes.items()
                    }
                    if attempt > 0 and not any(recorded.values()):
                        # the commit of the attempt before reached the database, its reply did not:
                        # the rows and their counts are written already; count nothing twice
                        return {outcome: len(params) for outcome, params in changes.items()}
                    counts, unsure = counts_by_campaign(changes, recorded, hard_bounces)
                    add_counts(self.conn, time.time(), counts)
                    if unsure and (counted := hourly_counts_sql(self.conn, unsure, hard_bounces, self.state)):
                        self.conn.exec_driver_sql(*counted)
                    return recorded
            except Exception as error:
                self._drop_connection()
                if attempt >= 5:
                    log.error("cannot record %d delivery results: %s; stopping", count, error)
                    self.state.fatal.append(error)
                    self.database_down = True
                    return {}
                # 0.5, 1, 2, 4, 8 s (RECORD_RETRY_SECONDS in all), scaled down for a short lease
                time.sleep(0.5 * 2**attempt * self.state.options.record_retry / RECORD_RETRY_SECONDS)
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        if self.conn is not None:  # a new connection for the next attempt
            try:
                self.conn.invalidate()
                self.conn.close()
            except Exception:  # noqa: BLE001 - it is being dropped anyway
                pass
            self.conn = None


_COUNTED_STATUS = {"sent": ("sent", "sent"), "failed": ("failed", "failed"), "retry": ("retried", "pending")}


def counts_by_campaign(
    changes: dict[str, list[dict[str, Any]]], recorded: dict[str, int], hard_bounces: list[Suppression]
) -> tuple[Counter[tuple[str, str]], dict[str, list[dict[str, Any]]]]:
    """The group's counts per campaign for hourly_counts (sent, failed, retried, bounced), and
    the outcomes where a row was not recorded (another run took it over): those are read back
    from the rows (:func:`hourly_counts_sql`), which costs ~1 ms a commit, so only then."""
    counts: Counter[tuple[str, str]] = Counter()
    unsure = {}
    for outcome, params in changes.items():
        if outcome not in _COUNTED_STATUS:
            continue
        if recorded[outcome] != len(params):
            unsure[outcome] = params
            continue
        name = _COUNTED_STATUS[outcome][0]
        for row in params:
            counts[(row["campaign"], name)] += 1
    bounced = {bounce.source for bounce in hard_bounces}
    if bounced and "failed" not in unsure:
        for row in changes.get("failed", []):
            if row["id"] in bounced:
                counts[(row["campaign"], "bounced")] += 1
    return counts, unsure


def hourly_counts_sql(
    conn: Connection,
    changes: dict[str, list[dict[str, Any]]],
    hard_bounces: list[Suppression],
    state: RunState,
) -> tuple[str, dict[str, Any]] | None:
    """One upsert of the group's counts per campaign into hourly_counts (sent, failed, retried,
    bounced), read back from the rows this run just changed: a row another run took over is not
    counted (its claim is no longer this run's)."""
    arms, params = [], {"hour": hour_of(time.time()), "token": state.run_token}
    lists = {outcome: [p["id"] for p in changes.get(outcome, [])] for outcome in _COUNTED_STATUS}
    if "failed" in changes:
        lists["bounced"] = [bounce.source for bounce in hard_bounces]
    for outcome, ids in lists.items():
        if not ids:
            continue
        name, status = _COUNTED_STATUS.get(outcome, ("bounced", "failed"))
        params[outcome] = list_param(conn, ids)
        arms.append(
            f"SELECT CAST(:hour AS FLOAT) AS hour, campaign_id, '{name}' AS name, count(*) AS n FROM deliveries "
            f"WHERE {in_list(conn, 'delivery_id', outcome)} AND status = '{status}' AND claimed_by = :token "
            "GROUP BY campaign_id"
        )
    if not arms:  # only releases
        return None
    return driver_sql(conn, upsert_selected_sql(" UNION ALL ".join(arms))), params


def _hard_bounces(items: list[Result]) -> list[Suppression]:
    """A 5xx saying the address is bad (5.1.1...): its address suppressed for every campaign, the
    delivery id as the source (:mod:`include.bounces.codes`)."""
    return [
        Suppression(item.job.rendered.envelope_to, "hard_bounce", EVERY_CAMPAIGN, item.job.delivery_id)
        for item in items
        if item.outcome == "failed" and is_hard_bounce_reply(item.reply)
    ]
