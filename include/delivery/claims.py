"""The producer of one run: select the due rows, re-check, render and claim them, queue the jobs.

For each batch: the rows render (in the render processes, if any) while their eligibility is
checked again here (:func:`include.delivery.eligibility.recheck_eligibility`); then for each
rendered part, in one transaction, the rows that may no longer go are ``suppressed`` (or
``failed`` for a template error) and the rest are claimed (``sending``, attempts + 1). The
claimed jobs are queued for the senders, round-robin over recipient domains. The producer stays
about two batches ahead of the senders.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, text, update

from include.config import TriggersConfig
from include.database.schema import deliveries
from include.database.sql import driver_sql
from include.delivery.controls import EXPIRED, SendTimeRules, due_scope, hold_until
from include.delivery.eligibility import recheck_eligibility
from include.delivery.render import RenderedEmail
from include.delivery.render_pool import RECIPIENT_COLUMNS, BatchRenderer, Rendered, Row
from include.delivery.state import Job, RunState


def _backoff_case(max_attempts: int, base: float, cap: float) -> str:
    """SQL: seconds to wait after the attempts-th failed attempt (portable: no power())."""
    whens = " ".join(f"WHEN {n} THEN {min(cap, base * 2 ** (n - 1))!r}" for n in range(1, max_attempts + 1))
    return f"CASE attempts {whens} ELSE {cap!r} END"


def _interleave_domains(jobs: list[Job]) -> list[Job]:
    """Round-robin over recipient domains, so one throttled domain does not hold up the rest."""
    by_domain: dict[str, list[Job]] = {}
    for job in jobs:
        by_domain.setdefault(job.domain, []).append(job)
    if len(by_domain) <= 1:
        return jobs
    return [job for group in itertools.zip_longest(*by_domain.values()) for job in group if job is not None]


class Producer:
    """Runs in the coordinating thread (:meth:`run`) until nothing is due or the run stops."""

    def __init__(
        self, engine: Engine, config: TriggersConfig, state: RunState, renderer: BatchRenderer
    ) -> None:
        options = state.options
        self.engine = engine
        self.config = config
        self.state = state
        self.options = options
        self.renderer = renderer
        self.backoff_sql = _backoff_case(options.max_attempts, options.retry_delay, options.max_retry_delay)
        # the next batch is prepared once fewer than this many jobs wait (its rendering is then
        # off this process while the queued ones are sent)
        self.queue_ahead = max(2 * options.batch_size, 2 * options.connections * options.window)
        self.claimed = 0
        self.send_time = SendTimeRules(config)

    def run(self) -> None:
        state, options = self.state, self.options
        while not state.stopping:
            if options.max_messages is not None and self.claimed >= options.max_messages:
                return
            limit = (
                options.batch_size
                if options.max_messages is None
                else min(options.batch_size, options.max_messages - self.claimed)
            )
            self._wait_for_room()
            rows = self._select_due(limit)
            if not rows:
                if state.outstanding > 0:  # results still to come may be retries due soon
                    self._sleep(0.02)
                    continue
                wait = self._seconds_to_next_retry()
                if wait is None or wait > options.wait_for_retries:
                    return
                self._sleep(max(0.01, wait))
                continue
            for jobs in self._prepare(rows, limit):
                for job in jobs:
                    if state.stopping:
                        state.release(job)
                    else:  # a job queued after the last sender stopped is released at the end
                        state.work.put(job)

    def _wait_for_room(self) -> None:
        work, state = self.state.work, self.state
        while work.qsize() >= self.queue_ahead and not state.stopping:
            time.sleep(0.01)  # the queue holds at least a batch: a poll costs less than a wake-up per message

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.state.fatal and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _scope(self) -> tuple[str, dict[str, Any]]:
        """Rows of enabled campaigns past their not_before (controls.due_scope), of the interval if any."""
        scope, params = due_scope(self.engine, self.config, self.state.clock())
        interval = self.options.interval
        if interval is None:
            return scope, params
        return scope + " AND d.event_time >= :start AND d.event_time < :end", {
            **params,
            "start": interval[0],
            "end": interval[1],
        }

    def due_rows(self, limit: int) -> list[Row]:
        """The rows :meth:`run` would take next, unclaimed (what a dry run reports on)."""
        return self._select_due(limit)

    def _select_due(self, limit: int) -> list[Row]:
        """The next due rows, with their recipient's columns and their event, as plain dicts."""
        scope, params = self._scope()
        recipient_columns = ", ".join(f'r."{c}" AS "r_{c}"' for c in RECIPIENT_COLUMNS)
        sql = driver_sql(
            self.engine,
            f"""SELECT d.delivery_id, d.campaign_id, d.recipient_id, d.email, d.event_id, d.event_time, d.attempts,
                       {recipient_columns}, e.trigger_id AS e_trigger_id, e.payload AS e_payload
                FROM deliveries d
                LEFT JOIN recipients r ON r.recipient_id = d.recipient_id
                LEFT JOIN pipeline_events e ON e.event_id = d.event_id
                WHERE d.status = 'pending'
                  AND (d.attempts = 0 OR d.claimed_at IS NULL OR d.claimed_at <= :now - ({self.backoff_sql})){scope}
                ORDER BY d.decided_at, d.event_time, d.delivery_id
                LIMIT :limit""",
        )
        with self.engine.connect() as conn:  # the driver's rows: SQLAlchemy's mappings cost ~20 µs a row here
            result = conn.exec_driver_sql(sql, {"now": self.state.clock(), "limit": limit, **params})
            names = list(result.keys())
            return [dict(zip(names, row, strict=True)) for row in result.cursor.fetchall()]

    def _seconds_to_next_retry(self) -> float | None:
        scope, params = self._scope()
        sql = text(
            f"SELECT MIN(d.claimed_at + ({self.backoff_sql})) FROM deliveries d WHERE d.status = 'pending'{scope}"
        )
        with self.engine.connect() as conn:
            due = conn.execute(sql, params).scalar()
        return None if due is None else max(0.0, float(due) - self.state.clock())

    def _prepare(self, rows: list[Row], limit: int) -> Iterator[list[Job]]:
        """Render (in the render processes while eligibility is re-checked here); then for each
        rendered part, in one transaction: suppress, fail, claim the rest; yields the claimed jobs."""
        closed: list[dict[str, Any]] = []  # status changes that are not a claim
        holds = self.send_time.holds(rows, self.state.clock())
        hold_until(self.engine, holds.held)  # outside its send window: pending until it opens
        self.state.count("held_send_window", len(holds.held))
        closed += [{"id": d, "status": "suppressed", "reason": EXPIRED} for d in holds.expired]
        waiting = holds.expired | set(holds.held)
        known = [row for row in rows if row["delivery_id"] not in waiting]
        parts = self.renderer.parts(known, limit)
        with self.engine.connect() as conn:
            reasons = recheck_eligibility(conn, self.config, known)
            eligibility = dict(zip((row["delivery_id"] for row in known), reasons, strict=True))
        if not known:
            self._claim({}, {}, closed)
        for part, outcomes in parts:
            rendered = _sendable(part, outcomes, eligibility, closed)
            attempts = {row["delivery_id"]: int(row["attempts"]) + 1 for row in part}
            yield self._claim(rendered, attempts, closed)
            closed = []

    def _claim(
        self, rendered: dict[str, RenderedEmail], attempts: dict[str, int], closed: list[dict[str, Any]]
    ) -> list[Job]:
        """In one transaction: record the suppressed and failed rows, claim the rendered ones."""
        state = self.state
        now = state.clock()
        claimed: set[str] = set()
        if closed or rendered:
            with self.engine.begin() as conn:
                if closed:
                    conn.execute(
                        text(
                            "UPDATE deliveries SET status = :status, reason = :reason "
                            "WHERE delivery_id = :id AND status = 'pending'"
                        ),
                        [{"id": c["id"], "status": c["status"], "reason": c["reason"]} for c in closed],
                    )
                if rendered:
                    result = conn.execute(
                        update(deliveries)
                        .where(deliveries.c.status == "pending", deliveries.c.delivery_id.in_(list(rendered)))
                        .values(
                            status="sending",
                            claimed_by=state.run_token,
                            claimed_at=now,
                            attempts=deliveries.c.attempts + 1,
                        )
                        .returning(deliveries.c.delivery_id)
                    )
                    claimed = set(result.scalars())
        for change in closed:
            key = (
                change["status"]
                if change["status"] != "suppressed"
                else f"suppressed_{change['reason'].split(':')[0]}"
            )
            state.count("render_failed" if change["status"] == "failed" else key)
        self.claimed += len(claimed)
        with state.lock:
            state.outstanding += len(claimed)
        state.count("lost_claim_race", len(rendered) - len(claimed))
        jobs = [
            Job(d, rendered[d], attempts[d], now, rendered[d].envelope_to.rpartition("@")[2])
            for d in rendered
            if d in claimed
        ]
        return _interleave_domains(jobs)


def _sendable(
    part: list[Row],
    outcomes: list[Rendered],
    eligibility: dict[str, str | None],
    closed: list[dict[str, Any]],
) -> dict[str, RenderedEmail]:
    """The messages of ``part`` that may go; the other rows' status changes are added to ``closed``."""
    rendered: dict[str, RenderedEmail] = {}
    for row, outcome in zip(part, outcomes, strict=True):
        delivery_id = row["delivery_id"]
        reason = eligibility[delivery_id]
        if isinstance(outcome, RenderedEmail):
            if reason is None:
                rendered[delivery_id] = outcome
            else:
                closed.append({"id": delivery_id, "status": "suppressed", "reason": reason})
        elif outcome[0] == "invalid_email":
            closed.append({"id": delivery_id, "status": "suppressed", "reason": "invalid_email"})
        else:
            closed.append(
                {"id": delivery_id, "status": "failed", "reason": f"{outcome[0]}: {outcome[1]}"[:500]}
            )
    return rendered
