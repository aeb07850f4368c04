"""The producer of one run: claim the due rows, re-check and render them, queue the jobs.

For each batch: the due rows are claimed first (``sending``, attempts + 1, in one transaction;
on PostgreSQL the select takes them ``FOR UPDATE SKIP LOCKED``, so that several workers on one
queue claim disjoint rows and never render the same ones); they render (in the render
processes, if any) while their eligibility is checked again here
(:func:`include.delivery.eligibility.recheck_eligibility`); then for each rendered part, in one
transaction, the rows that may no longer go are ``suppressed`` (or ``failed`` for a template
error) and the rows held for their send window go back to ``pending``, their claim undone
(attempts and the previous claim's time restored: it was no relay attempt). The claimed jobs are
queued for the senders, round-robin over recipient domains. The producer stays about two batches
ahead of the senders. SQLite has no row locks: one worker per database there
(:func:`~include.delivery.scaleout.check_workers`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, text, update
from sqlalchemy.exc import SQLAlchemyError

from include.config import TriggersConfig
from include.database.hourly import SUPPRESSED, add_counts
from include.database.schema import deliveries
from include.database.sql import driver_sql
from include.delivery.controls import EXPIRED, SendTimeRules, due_scope
from include.delivery.eligibility import recheck_eligibility
from include.delivery.recovery import requeue_interrupted
from include.delivery.render import RenderedEmail
from include.delivery.render_pool import RECIPIENT_COLUMNS, BatchRenderer, Rendered, Row
from include.delivery.scaleout import delivery_workers, is_mapped, sibling_of
from include.delivery.state import Job, RunState

log = logging.getLogger(__name__)


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
        rate = config.limits.rate.per_second if config.limits.rate else None
        if rate:  # a claim older than lease/2 is given back unsent: claim no more than lease/8 of
            # sending, the rate being shared by the workers (TRIGGERS_DELIVERY_WORKERS)
            ahead = int(rate * options.lease / 8 / delivery_workers())
            self.queue_ahead = min(self.queue_ahead, max(2 * options.connections * options.window, ahead))
        self.claimed = 0
        self.claimed_at = 0.0
        self.send_time = SendTimeRules(config)
        # rows locked by a worker still claiming are skipped, not waited for (PostgreSQL)
        self.lock_clause = " FOR UPDATE OF d SKIP LOCKED" if engine.dialect.name == "postgresql" else ""
        # a worker that died mid-batch leaves claims that a live one takes over after the lease
        self.takeover_every = max(1.0, min(30.0, options.lease / 4))
        self.last_takeover = time.monotonic()

    def run(self) -> None:
        state, options = self.state, self.options
        while not state.stopping:
            if options.max_messages is not None and self.claimed >= options.max_messages:
                return
            limit = min(options.batch_size, self.queue_ahead)
            if options.max_messages is not None:
                limit = min(limit, options.max_messages - self.claimed)
            self._wait_for_room()
            self._take_over()
            rows = self._claim_due(limit)
            if not rows:
                if state.outstanding > 0 or self._others_sending():  # results to come may be retries
                    self._sleep(0.02 if state.outstanding > 0 else 0.5)
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

    def _take_over(self, force: bool = False) -> None:
        """Every ``takeover_every`` seconds: requeue the claims of workers that are gone (lease
        expired, or their process on this host dead), so that a live claimer sends them."""
        if not force and time.monotonic() - self.last_takeover < self.takeover_every:
            return
        self.last_takeover = time.monotonic()
        self.state.count(
            "requeued_interrupted", take_over(self.engine, self.options.lease, self.state.clock())
        )

    def _others_sending(self) -> bool:
        """Whether to wait for rows a sibling (another mapped task of this DAG run) holds in
        ``sending``: until they are done or their lease expires, so that a dead sibling's claims are
        taken over and sent in this run. Other runs' claims are left to them (or a later run)."""
        if self.options.max_messages is not None or not is_mapped(self.options.worker_id):
            return False
        with self.engine.connect() as conn:
            claims = conn.execute(
                text(
                    "SELECT claimed_by, MIN(claimed_at) FROM deliveries "
                    "WHERE status = 'sending' AND claimed_by <> :me GROUP BY claimed_by"
                ),
                {"me": self.state.run_token},
            ).all()
        siblings = [oldest for by, oldest in claims if sibling_of(self.options.worker_id, by or "")]
        if not siblings:
            return False
        expired = min(oldest or 0.0 for oldest in siblings) + self.options.lease <= self.state.clock()
        self._take_over(force=expired)
        return True

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
        rows = self._select_due(limit)
        for row in rows:
            del row["prev_claimed_at"], row["prev_claimed_by"]
        return rows

    def _select_due(self, limit: int, conn: Connection | None = None, lock: str = "") -> list[Row]:
        """The next due rows, with their recipient's columns, their event and their claim
        (``prev_claimed_at``, ``prev_claimed_by``), as plain dicts."""
        scope, params = self._scope()
        recipient_columns = ", ".join(f'r."{c}" AS "r_{c}"' for c in RECIPIENT_COLUMNS)
        sql = driver_sql(
            self.engine,
            f"""SELECT d.delivery_id, d.campaign_id, d.recipient_id, d.email, d.event_id, d.event_time, d.attempts,
                       {recipient_columns}, e.trigger_id AS e_trigger_id, e.payload AS e_payload,
                       d.claimed_at AS prev_claimed_at, d.claimed_by AS prev_claimed_by
                FROM deliveries d
                LEFT JOIN recipients r ON r.recipient_id = d.recipient_id
                LEFT JOIN pipeline_events e ON e.event_id = d.event_id
                WHERE d.status = 'pending'
                  AND (d.attempts = 0 OR d.claimed_at IS NULL OR d.claimed_at <= :now - ({self.backoff_sql})){scope}
                ORDER BY d.decided_at, d.event_time, d.delivery_id
                LIMIT :limit{lock}""",
        )
        args = {"now": self.state.clock(), "limit": limit, **params}
        if conn is None:
            with (
                self.engine.connect() as own
            ):  # the driver's rows: SQLAlchemy's mappings cost ~20 µs a row here
                result = own.exec_driver_sql(sql, args)
                names = list(result.keys())
                return [dict(zip(names, row, strict=True)) for row in result.cursor.fetchall()]
        result = conn.exec_driver_sql(sql, args)
        names = list(result.keys())
        return [dict(zip(names, row, strict=True)) for row in result.cursor.fetchall()]

    def _claim_due(self, limit: int) -> list[Row]:
        """Claim the next due rows (``sending``, attempts + 1) and return them (``attempts`` as
        before the claim). On PostgreSQL the rows are locked as they are selected, in the claim's
        transaction, and rows another worker is claiming are skipped: concurrent claimers get
        disjoint rows. On SQLite (one worker) the read comes first, then the claim in a write
        transaction of its own (a WAL read snapshot that went stale cannot become a write)."""
        now = self.state.clock()
        if self.lock_clause:
            with self.engine.begin() as conn:
                rows = self._select_due(limit, conn, self.lock_clause)
                claimed = self._mark_claimed(conn, rows, now)
        else:
            rows = self._select_due(limit)
            with self.engine.begin() as conn:
                claimed = self._mark_claimed(conn, rows, now)
        # only without row locks (SQLite) can another process have claimed a row in between
        self.state.count("lost_claim_race", len(rows) - len(claimed))
        self.claimed_at = now
        return [row for row in rows if row["delivery_id"] in claimed]

    def _mark_claimed(self, conn: Connection, rows: list[Row], now: float) -> set[str]:
        if not rows:
            return set()
        result = conn.execute(
            update(deliveries)
            .where(
                deliveries.c.status == "pending",
                deliveries.c.delivery_id.in_([row["delivery_id"] for row in rows]),
            )
            .values(
                status="sending",
                claimed_by=self.state.run_token,
                claimed_at=now,
                attempts=deliveries.c.attempts + 1,
            )
            .returning(deliveries.c.delivery_id)
        )
        return set(result.scalars())

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
        rendered part, in one transaction: suppress, fail, hold (claims undone); yields the jobs.
        Rows not handled when this stops early (an error) are given back, their claim undone."""
        previous = {
            row["delivery_id"]: (row.pop("prev_claimed_at"), row.pop("prev_claimed_by"), row["campaign_id"])
            for row in rows
        }
        unhandled = set(previous)
        try:
            closed: list[dict[str, Any]] = []  # status changes that are not a send
            holds = self.send_time.holds(rows, self.state.clock())
            self.state.count("held_send_window", len(holds.held))
            closed += [{"id": d, "status": "suppressed", "reason": EXPIRED} for d in holds.expired]
            closed += [
                {"id": d, "status": "pending", "reason": None, "until": u} for d, u in holds.held.items()
            ]
            waiting = holds.expired | set(holds.held)
            known = [row for row in rows if row["delivery_id"] not in waiting]
            parts = self.renderer.parts(known, limit)
            with self.engine.connect() as conn:
                reasons = recheck_eligibility(conn, self.config, known)
                eligibility = dict(zip((row["delivery_id"] for row in known), reasons, strict=True))
            if not known:
                self._close(closed, previous)
                unhandled.clear()
            for part, outcomes in parts:
                rendered = _sendable(part, outcomes, eligibility, closed)
                attempts = {row["delivery_id"]: int(row["attempts"]) + 1 for row in part}
                campaigns = {row["delivery_id"]: row["campaign_id"] for row in part}
                self._close(closed, previous)
                unhandled -= {c["id"] for c in closed}
                unhandled -= {row["delivery_id"] for row in part}
                closed = []
                yield self._jobs(rendered, attempts, campaigns)
        finally:
            if unhandled:
                self._close(
                    [{"id": d, "status": "pending", "reason": None, "until": None} for d in unhandled],
                    previous,
                )

    def _close(self, closed: list[dict[str, Any]], previous: dict[str, tuple[Any, Any, str]]) -> None:
        """In one transaction: the claimed rows that do not go now get their status (suppressed,
        failed, or pending again with their send window's opening), their claim undone, and the
        suppressed and failed ones are counted per campaign for the status view."""
        if not closed:
            return
        counted: Counter[tuple[str, str]] = Counter()
        for change in closed:
            if change["status"] == "pending":
                continue
            key = (
                change["status"]
                if change["status"] != "suppressed"
                else f"{SUPPRESSED}{change['reason'].split(':')[0]}"
            )
            counted[(previous[change["id"]][2], key)] += 1
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE deliveries SET status = :status, reason = COALESCE(:reason, reason), "
                    "not_before = COALESCE(:until, not_before), claimed_at = :prev_at, claimed_by = :prev_by, "
                    "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
                    "WHERE delivery_id = :id AND status = 'sending' AND claimed_by = :me"
                ),
                [
                    {
                        "id": c["id"],
                        "status": c["status"],
                        "reason": c["reason"],
                        "until": c.get("until"),
                        "prev_at": previous[c["id"]][0],
                        "prev_by": previous[c["id"]][1],
                        "me": self.state.run_token,
                    }
                    for c in closed
                ],
            )
            add_counts(conn, self.state.clock(), counted)
        for (_, key), n in counted.items():
            self.state.count("render_failed" if key == "failed" else key, n)

    def _jobs(
        self, rendered: dict[str, RenderedEmail], attempts: dict[str, int], campaigns: dict[str, str]
    ) -> list[Job]:
        """The claimed, rendered, eligible rows as jobs, round-robin over recipient domains."""
        state = self.state
        self.claimed += len(rendered)
        with state.lock:
            state.outstanding += len(rendered)
        jobs = [
            Job(
                d,
                rendered[d],
                attempts[d],
                self.claimed_at,
                rendered[d].envelope_to.rpartition("@")[2],
                campaigns[d],
            )
            for d in rendered
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


def take_over(engine: Engine, lease: float, now: float) -> int:
    """:func:`~include.delivery.recovery.requeue_interrupted`, an error of which (a deadlock
    with another worker's requeue, a dropped connection) is logged, not raised: the run goes on
    and the claims are taken over at the next try (0 requeued now)."""
    try:
        return requeue_interrupted(engine, lease=lease, now=now)
    except SQLAlchemyError as error:
        log.warning("taking over the claims of dead workers failed, tried again later: %s", error)
        return 0
