"""Sending the pending deliveries over SMTP, each ``delivery_id`` at most once (SPEC sections 6, 7).

The protocol of one delivery row::

    pending --claim (one transaction per batch, attempts+1)--> sending --SMTP 250--> sent
                                                                   \\--5xx--> failed (the reply)
                                                                   \\--4xx or dropped--> pending
                                                                        (retried after a backoff;
                                                                         failed after max_attempts)

* **Eligibility** is checked again just before each batch is claimed
  (:func:`include.delivery.eligibility.still_eligible`): opted out, cancelled... -> ``suppressed``.
* **Recording**: the 250 is written by a recorder thread that commits whatever results are waiting
  in one transaction (group commit): when idle every message gets its own commit right after its
  250; under load a commit covers the messages that arrived during the previous one. A connection
  never has more than ``window`` messages acknowledged by the server but not yet committed, so a
  crash can leave at most ``connections * window`` messages whose 250 was not recorded.
* **A crash** leaves rows in ``sending``. A later run gives them back to ``pending`` once their
  worker is known dead (same host and its process is gone) or its lease expired: those that never
  left are sent once; only the at most ``connections * window`` that the server had accepted are
  sent again, which is the window SPEC section 7 allows, and they carry the same ``Message-ID``.
  A live worker never sends a claim older than half the lease, so a lease expiry cannot race it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import smtplib
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text, update

from include.config import TriggersConfig
from include.database.schema import deliveries, ensure_schema, recipients
from include.database.sql import driver_sql
from include.delivery.eligibility import recheck_eligibility
from include.delivery.render import (
    DEFAULT_UNSUBSCRIBE_URL,
    UNSUBSCRIBE_URL_ENV,
    RenderedEmail,
    Renderer,
    event_context,
    normalize_email,
    unsubscribe_url_for,
)
from include.errors import InvalidEmailError, SmtpUnavailableError, TemplateRenderError
from include.runtime import spawn_pool

log = logging.getLogger(__name__)

RECIPIENT_COLUMNS = tuple(c.name for c in recipients.columns)
_ACTIVE_RUNS: set[str] = set()  # run tokens of deliver_pending calls running in this process
_TRUE = {"1", "true", "yes", "on"}
RECORD_LINGER = 0.005  # seconds a result may wait for others to share its commit (window > 1)
SWITCH_INTERVAL = 0.0001  # GIL hand-over while sending: a thread whose reply arrived waits less
RENDER_POOL_MIN_ROWS = 200  # a full batch at least this big starts the render process(es)
RENDER_PART = 200  # rows rendered, claimed and queued together: the first are sent while the next render


def _flag(value: Any) -> bool:
    return value.strip().lower() in _TRUE if isinstance(value, str) else bool(value)


@dataclass(frozen=True)
class SmtpSettings:
    """The ``smtp_default`` connection read with the SMTP provider's conventions.

    host, port, login, password; extras ``from_email``, ``disable_ssl`` (default false: SMTP over
    SSL, port 465), ``disable_tls`` (default false: STARTTLS on a plain connection), ``timeout``
    (30 s), ``retry_limit`` (5 connection attempts), ``ssl_context`` (``default`` or ``none``).
    One difference: STARTTLS is not attempted inside an SSL connection (the provider would).
    """

    host: str = "localhost"
    port: int | None = None
    login: str = ""
    password: str = field(default="", repr=False)
    use_ssl: bool = True
    starttls: bool = True
    timeout: float = 30.0
    retry_limit: int = 5
    from_email: str | None = None
    verify_certificates: bool = True

    @classmethod
    def from_connection(cls, conn: Any) -> SmtpSettings:
        """From an Airflow Connection or anything with host/port/login/password/extra_dejson."""
        extra = getattr(conn, "extra_dejson", None) or {}
        ssl_context = extra.get("ssl_context")
        if ssl_context not in (None, "default", "none"):
            raise SmtpUnavailableError(f"smtp_default extra ssl_context must be 'default' or 'none', not {ssl_context!r}")
        return cls(
            host=conn.host or "localhost",
            port=int(conn.port) if conn.port else None,
            login=conn.login or "",
            password=conn.password or "",
            use_ssl=not _flag(extra.get("disable_ssl", False)),
            starttls=not _flag(extra.get("disable_tls", False)),
            timeout=float(extra.get("timeout", 30)),
            retry_limit=int(extra.get("retry_limit", 5)),
            from_email=extra.get("from_email"),
            verify_certificates=ssl_context != "none",
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port or (465 if self.use_ssl else 25)}"

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.verify_certificates:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def connect(self) -> smtplib.SMTP:
        """A connected, greeted and logged-in client. Login errors never show the password."""
        if self.use_ssl:
            client: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port or 465, timeout=self.timeout, context=self._ssl_context())
        else:
            client = smtplib.SMTP(self.host, self.port or 25, timeout=self.timeout)
        try:
            client.ehlo()
            if self.starttls and not self.use_ssl:
                client.starttls(context=self._ssl_context())
                client.ehlo()
            if self.login and self.password:
                client.login(self.login, self.password)
        except smtplib.SMTPNotSupportedError:
            client.close()
            raise SmtpUnavailableError(
                f"SMTP relay {self.address} does not offer STARTTLS; set extra disable_tls: true only if it is "
                "on a trusted network, or use disable_ssl: false with its SSL port"
            ) from None
        except smtplib.SMTPAuthenticationError as error:
            client.close()
            raise SmtpUnavailableError(
                f"SMTP relay {self.address} refused the login of {self.login!r} ({error.smtp_code}); check the "
                "smtp_default connection's login and password"
            ) from None
        except BaseException:
            client.close()
            raise
        return client


# ---------------------------------------------------------------------------------------------
# Rate limits (SPEC section 4: limits.rate)
# ---------------------------------------------------------------------------------------------
class RateLimiter:
    """Strict spacing overall and per recipient domain, shared by the sending threads."""

    def __init__(self, per_second: float | None = None, per_domain_per_second: float | None = None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self.domain_interval = 1.0 / per_domain_per_second if per_domain_per_second else 0.0
        self._next_any = 0.0
        self._next_domain: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return not (self.interval or self.domain_interval)

    def reserve(self, domain: str) -> float:
        """The monotonic time at which a message to ``domain`` may go (the slot is taken)."""
        if self.unlimited:
            return 0.0
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next_any, self._next_domain.get(domain, 0.0))
            if self.interval:
                self._next_any = at + self.interval
            if self.domain_interval:
                self._next_domain[domain] = at + self.domain_interval
            return at

    def wait(self, domain: str) -> None:
        delay = self.reserve(domain) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# ---------------------------------------------------------------------------------------------
# Rendering, in this process or in render processes (CPU-bound: off the sending process's GIL)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _CampaignSpec:
    id: str
    template: str
    sender: str


# What a row renders to: the message, or (suppression/failure reason, detail)
_Rendered = RenderedEmail | tuple[str, str]


class _RowRenderer:
    """Delivery rows (plain dicts of the batch query) -> messages; picklable settings only."""

    def __init__(self, templates_dir: Path, unsubscribe_mailto: str | None, unsubscribe_url: str,
                 campaigns: Mapping[str, _CampaignSpec]) -> None:
        self.renderer = Renderer(templates_dir, unsubscribe_mailto=unsubscribe_mailto)
        self.unsubscribe_url = unsubscribe_url
        self.campaigns = campaigns

    def render_rows(self, rows: list[dict[str, Any]]) -> list[_Rendered]:
        out: list[_Rendered] = []
        for row in rows:
            try:
                out.append(self.render_row(row))
            except InvalidEmailError:
                out.append(("invalid_email", ""))
            except TemplateRenderError as error:
                out.append(("template_error", str(error)))
        return out

    def render_row(self, row: Mapping[str, Any]) -> RenderedEmail:
        campaign = self.campaigns[row["campaign_id"]]
        recipient = {c: row[f"r_{c}"] for c in RECIPIENT_COLUMNS}
        recipient["email"] = row["email"] or recipient["email"]  # the address the decision recorded
        dimensions: dict[str, list[Any]] = {}
        if row["e_payload"]:
            try:
                from include.staging.parser import dimension_values

                dimensions = dimension_values(row["e_payload"])
            except (ValueError, TypeError, AttributeError):
                dimensions = {}
        event = event_context(row["e_trigger_id"], row["event_time"], dimensions)
        url = unsubscribe_url_for(row["delivery_id"], row["campaign_id"], row["recipient_id"], self.unsubscribe_url)
        return self.renderer.render_bytes(campaign, recipient, event, row["delivery_id"], url)


_WORKER_RENDERER: list[_RowRenderer] = []  # in a render process: the one set up by _start_render_worker


def _start_render_worker(*settings: Any) -> None:
    _WORKER_RENDERER[:] = [_RowRenderer(*settings)]


def _render_in_worker(rows: list[dict[str, Any]]) -> list[_Rendered]:
    return _WORKER_RENDERER[0].render_rows(rows)


def default_render_processes() -> int:
    """1 on up to 2 cores (the SMTP relay and the sending process need the rest), else up to 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Job:
    delivery_id: str
    rendered: RenderedEmail
    attempts: int
    claimed_at: float
    domain: str


@dataclass(slots=True)
class _Result:
    job: _Job
    outcome: str  # sent, failed, retry, release
    reply: str
    at: float
    done: threading.Semaphore | None = None


_STOP = object()
_RECORDED = {  # a result's outcome -> what its row becomes
    "sent": "status = 'sent', sent_at = :at, smtp_reply = :reply, reason = NULL",
    "failed": "status = 'failed', reason = :reason, smtp_reply = :reply",
    "retry": "status = 'pending', claimed_at = :at, smtp_reply = :reply, reason = 'retry: ' || :reply",
    "release": "status = 'pending', attempts = attempts - 1",  # never handed to the server: the claim did not count
}


def _reply_text(code: int, message: bytes | str) -> str:
    text_ = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text_.split())}"[:500]


def _backoff_case(max_attempts: int, base: float, cap: float) -> str:
    """SQL: seconds to wait after the attempts-th failed attempt (portable: no power())."""
    whens = " ".join(f"WHEN {n} THEN {min(cap, base * 2 ** (n - 1))!r}" for n in range(1, max_attempts + 1))
    return f"CASE attempts {whens} ELSE {cap!r} END"


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA body as it goes on the wire: a second dot before each line that starts with one,
    then the end mark (RFC 5321 4.5.2); the same bytes as smtplib's ``data`` without its regex."""
    body = data.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")


_ACCEPTED = ((250,), (250, 251), (354,))  # what MAIL, RCPT and DATA answer when all is well


def _transaction(
    client: smtplib.SMTP, commands: tuple[bytes, bytes, bytes], data: bytes, *, opened: bool = False, following: bytes = b""
) -> tuple[int, bytes, bool, bool]:
    """One message: (the reply to its body or the first refusal, whether the body went, whether
    ``following`` went behind it).

    When the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go in one write and their
    three replies are read together; the body goes only once all three were accepted, with the
    next message's MAIL, RCPT and DATA (``following``) in the same write: one round trip per
    message. ``opened``: this message's commands already went that way. Without PIPELINING
    each command waits for its reply.
    """
    pipelining = client.has_extn("pipelining")
    if pipelining and not opened:
        client.send(b"".join(commands))
    replies = []
    for command, accepted in zip(commands, _ACCEPTED, strict=True):
        if not pipelining:
            client.send(command)
        code, message = client.getreply()
        replies.append((code, message))
        if code == 421 or (code not in accepted and not pipelining):  # 421: closing, no further reply
            return code, message, False, False
    if all(reply[0] in accepted for reply, accepted in zip(replies, _ACCEPTED, strict=True)):
        chained = pipelining and bool(following)
        client.send(_dot_stuffed(data) + following if chained else _dot_stuffed(data))
        code, message = client.getreply()
        return code, message, True, chained and code != 421
    if replies[2][0] == 354:
        client.send(b".\r\n")  # RFC 2920 3.1: DATA accepted though no recipient was: end it empty
        client.getreply()
    for (code, message), accepted in zip(replies, _ACCEPTED, strict=True):
        if code not in accepted and code >= 400:
            return code, message, False, False
    client.close()  # DATA answered neither 354 nor an error: the server is out of step with us
    raise smtplib.SMTPServerDisconnected(f"DATA answered {replies[2][0]}")


class _Delivery:
    """One call of :func:`deliver_pending`: a coordinator (this thread), senders and a recorder."""

    def __init__(self, engine: Engine, config: TriggersConfig, smtp: SmtpSettings, **options: Any) -> None:
        self.engine = engine
        self.config = config
        self.smtp = smtp
        self.__dict__.update(options)
        self.run_token = f"{self.worker_id}|{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:12]}"
        self.campaigns = {c.id: _CampaignSpec(c.id, c.template, c.sender) for c in config.campaigns}
        self.row_renderer = _RowRenderer(
            self.templates_dir, None, self.unsubscribe_url or os.environ.get(UNSUBSCRIBE_URL_ENV) or DEFAULT_UNSUBSCRIBE_URL,
            self.campaigns)
        self.render_pool: ProcessPoolExecutor | None = None
        self.record_conn: Any = None
        rate = config.limits.rate
        self.limiter = RateLimiter(rate.per_second if rate else None, rate.per_domain_per_second if rate else None)
        self.counts: Counter[str] = Counter()
        self.counts_lock = threading.Lock()
        # claimed jobs for the senders, and their results for the recorder; SimpleQueue's put and
        # get cost a tenth of Queue's, which matters at one of each per message
        self.work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # the next batch is prepared once fewer than this many jobs wait (its rendering is then
        # off this process while the queued ones are sent)
        self.queue_ahead = max(2 * self.batch_size, 2 * self.connections * self.window)
        # a commit costs about the same whatever its size: the recorder lets a group of half the
        # windows form (the senders go on meanwhile) and a sender wakes it once one has formed
        self.group = max(1, self.connections * self.window // 2) if self.window > 1 else 1
        self.group_ready = threading.Event()
        # the recorder's statements, prepared once (SQLAlchemy's text() and compile cost ~100 µs a commit)
        self.record_sql = {
            outcome: driver_sql(engine, f"UPDATE deliveries SET {changes} "
                                         "WHERE delivery_id = :id AND status = 'sending' AND claimed_by = :token")
            for outcome, changes in _RECORDED.items()
        }
        self.fatal: list[BaseException] = []
        self.alive_senders = self.connections
        self.started = time.time()
        self.claimed = 0
        self.database_down = False
        self.outstanding = 0  # claimed by this run, result not yet committed
        self.envelope_from = normalize_email(smtp.from_email) if smtp.from_email else None

    # -- time ------------------------------------------------------------------------------
    def clock(self) -> float:
        return time.time() if self.now is None else self.now + (time.time() - self.started)

    def count(self, key: str, n: int = 1) -> None:
        with self.counts_lock:
            self.counts[key] += n

    # -- coordinator -----------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        ensure_schema(self.engine, self.config.dimensions)
        _ACTIVE_RUNS.add(self.run_token)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL))
        recorder = threading.Thread(target=self._record_loop, name="delivery-recorder", daemon=True)
        senders = [threading.Thread(target=self._send_loop, args=(i,), name=f"delivery-smtp-{i}", daemon=True)
                   for i in range(self.connections)]
        recorder.start()
        for sender in senders:
            sender.start()
        try:
            self.count("requeued_interrupted", requeue_interrupted(self.engine, lease=self.lease, now=self.clock()))
            self._produce()
        finally:
            for _ in senders:
                self.work.put(_STOP)
            for sender in senders:
                sender.join()
            self._release_queued()  # claimed but never handed to a connection
            self.results.put(_STOP)
            recorder.join()
            if self.render_pool is not None:
                self.render_pool.shutdown(wait=True, cancel_futures=True)
            _ACTIVE_RUNS.discard(self.run_token)
            sys.setswitchinterval(switch_interval)
        counts = {k: v for k, v in sorted(self.counts.items()) if v}
        log.info("delivery %s: %s", self.worker_id, counts)
        if self.fatal:
            error = self.fatal[0]
            if isinstance(error, SmtpUnavailableError):
                raise SmtpUnavailableError(f"{error} (counts so far: {counts})") from None
            raise error
        return counts

    def _produce(self) -> None:
        while not self.fatal and self.alive_senders > 0:
            if self.max_messages is not None and self.claimed >= self.max_messages:
                return
            limit = self.batch_size if self.max_messages is None else min(self.batch_size, self.max_messages - self.claimed)
            self._wait_for_room()
            rows = self._select_due(limit)
            if not rows:
                if self.outstanding > 0:  # results still to come may be retries due soon
                    self._sleep(0.02)
                    continue
                wait = self._seconds_to_next_retry()
                if wait is None or wait > self.wait_for_retries:
                    return
                self._sleep(max(0.01, wait))
                continue
            for jobs in self._prepare(rows, limit):
                for job in jobs:
                    if self.fatal or self.alive_senders <= 0:
                        self._record(_Result(job, "release", "", time.time()))
                    else:
                        self.work.put(job)  # a job queued after the last sender stopped is released by run()

    def _wait_for_room(self) -> None:
        while self.work.qsize() >= self.queue_ahead and not self.fatal and self.alive_senders > 0:
            time.sleep(0.01)  # the queue holds at least a batch: a poll costs less than a wake-up per message

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.fatal and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _scope(self) -> tuple[str, dict[str, Any]]:
        if self.interval is None:
            return "", {}
        return " AND d.event_time >= :start AND d.event_time < :end", {"start": self.interval[0], "end": self.interval[1]}

    def _select_due(self, limit: int) -> list[dict[str, Any]]:
        """The next due rows, with their recipient's columns and their event, as plain dicts."""
        scope, params = self._scope()
        recipient_columns = ", ".join(f'r."{c}" AS "r_{c}"' for c in RECIPIENT_COLUMNS)
        sql = driver_sql(self.engine,
            f"""SELECT d.delivery_id, d.campaign_id, d.recipient_id, d.email, d.event_id, d.event_time, d.attempts,
                       {recipient_columns}, e.trigger_id AS e_trigger_id, e.payload AS e_payload
                FROM deliveries d
                LEFT JOIN recipients r ON r.recipient_id = d.recipient_id
                LEFT JOIN pipeline_events e ON e.event_id = d.event_id
                WHERE d.status = 'pending'
                  AND (d.attempts = 0 OR d.claimed_at IS NULL OR d.claimed_at <= :now - ({self.backoff_sql})){scope}
                ORDER BY d.decided_at, d.event_time, d.delivery_id
                LIMIT :limit"""
        )
        with self.engine.connect() as conn:  # the driver's rows: SQLAlchemy's mappings cost ~20 µs a row here
            result = conn.exec_driver_sql(sql, {"now": self.clock(), "limit": limit, **params})
            names = list(result.keys())
            return [dict(zip(names, row, strict=True)) for row in result.cursor.fetchall()]

    def _seconds_to_next_retry(self) -> float | None:
        scope, params = self._scope()
        sql = text(f"SELECT MIN(d.claimed_at + ({self.backoff_sql})) FROM deliveries d WHERE d.status = 'pending'{scope}")
        with self.engine.connect() as conn:
            due = conn.execute(sql, params).scalar()
        return None if due is None else max(0.0, float(due) - self.clock())

    def _pool_for(self, rows: int, limit: int) -> ProcessPoolExecutor | None:
        """The render processes, started at the first full batch of at least RENDER_POOL_MIN_ROWS."""
        if self.render_pool is None and self.render_processes > 0 and rows >= max(limit, RENDER_POOL_MIN_ROWS):
            try:
                renderer = self.row_renderer
                self.render_pool = spawn_pool(  # they start while this batch is rendered here
                    self.render_processes, _start_render_worker,
                    (self.templates_dir, renderer.renderer.unsubscribe_mailto, renderer.unsubscribe_url, self.campaigns),
                )
            except (OSError, AssertionError, ValueError) as error:  # e.g. a daemonic process may not have children
                log.warning("rendering in this process: cannot start render processes (%s)", error)
                self.render_processes = 0
            return None
        return self.render_pool

    def _render_parts(self, rows: list[dict[str, Any]], limit: int) -> Iterator[tuple[list[dict[str, Any]], list[_Rendered]]]:
        """Start rendering ``rows`` (in the render processes, if any, right away); the iterator
        yields (rows, their results) part by part, in order, each as soon as it is ready, so that
        the first part is sent while the next renders."""
        parts = [rows[i:i + RENDER_PART] for i in range(0, len(rows), RENDER_PART)]
        pool = self._pool_for(len(rows), limit)
        if pool is None:
            return ((part, self.row_renderer.render_rows(part)) for part in parts)
        futures: list[Future[list[_Rendered]]] = [pool.submit(_render_in_worker, part) for part in parts]
        return self._rendered_parts(pool, parts, futures)

    def _rendered_parts(self, pool: ProcessPoolExecutor, parts: list[list[dict[str, Any]]], futures: list[Future[list[_Rendered]]]
                        ) -> Iterator[tuple[list[dict[str, Any]], list[_Rendered]]]:
        for i, (part, future) in enumerate(zip(parts, futures, strict=True)):
            try:
                results = future.result()
            except BrokenProcessPool as error:  # a render process died: go on without them
                log.warning("rendering in this process: a render process stopped (%s)", error)
                self.render_pool = None
                self.render_processes = 0
                pool.shutdown(wait=False, cancel_futures=True)
                for rest in parts[i:]:
                    yield rest, self.row_renderer.render_rows(rest)
                return
            yield part, results

    def _prepare(self, rows: list[dict[str, Any]], limit: int) -> Iterator[list[_Job]]:
        """Render (in the render processes while eligibility is re-checked here); then for each
        rendered part, in one transaction: suppress, fail, claim the rest; yields the claimed jobs."""
        closed: list[dict[str, Any]] = []  # status changes that are not a claim
        known = []
        for row in rows:
            if row["campaign_id"] in self.campaigns:
                known.append(row)
            else:
                closed.append({"id": row["delivery_id"], "status": "suppressed", "reason": "unknown_campaign"})
        parts = self._render_parts(known, limit)
        with self.engine.connect() as conn:
            eligibility = dict(zip((row["delivery_id"] for row in known), recheck_eligibility(conn, self.config, known), strict=True))
        if not known:
            self._claim({}, {}, closed)
        for part, outcomes in parts:
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
                    closed.append({"id": delivery_id, "status": "failed", "reason": f"template_error: {outcome[1]}"[:500]})
            attempts = {row["delivery_id"]: int(row["attempts"]) + 1 for row in part}
            yield self._claim(rendered, attempts, closed)
            closed = []

    def _claim(self, rendered: dict[str, RenderedEmail], attempts: dict[str, int], closed: list[dict[str, Any]]) -> list[_Job]:
        """In one transaction: record the suppressed and failed rows, claim the rendered ones."""
        now = self.clock()
        claimed: set[str] = set()
        if closed or rendered:
            with self.engine.begin() as conn:
                if closed:
                    conn.execute(
                        text("UPDATE deliveries SET status = :status, reason = :reason "
                             "WHERE delivery_id = :id AND status = 'pending'"),
                        [{"id": c["id"], "status": c["status"], "reason": c["reason"]} for c in closed],
                    )
                if rendered:
                    result = conn.execute(
                        update(deliveries)
                        .where(deliveries.c.status == "pending", deliveries.c.delivery_id.in_(list(rendered)))
                        .values(status="sending", claimed_by=self.run_token, claimed_at=now, attempts=deliveries.c.attempts + 1)
                        .returning(deliveries.c.delivery_id)
                    )
                    claimed = set(result.scalars())
        for change in closed:
            key = change["status"] if change["status"] != "suppressed" else f"suppressed_{change['reason'].split(':')[0]}"
            self.count("render_failed" if change["reason"].startswith("template_error") else key)
        self.claimed += len(claimed)
        with self.counts_lock:
            self.outstanding += len(claimed)
        self.count("lost_claim_race", len(rendered) - len(claimed))
        jobs = [_Job(d, rendered[d], attempts[d], now, rendered[d].envelope_to.rpartition("@")[2])
                for d in rendered if d in claimed]
        return _interleave_domains(jobs)

    # -- senders ---------------------------------------------------------------------------
    def _send_loop(self, index: int) -> None:
        window = threading.Semaphore(self.window)
        client: smtplib.SMTP | None = None
        held: _Job | None = None  # taken ahead, its window slot acquired: it goes next
        opened = False  # held's MAIL, RCPT and DATA went behind the previous body
        try:
            while True:
                if held is None:
                    job = self.work.get()
                    if job is _STOP:
                        return
                    if not self._sendable(job):
                        continue
                    window.acquire()
                    self.limiter.wait(job.domain)
                else:
                    job, held = held, None
                following = self._following(window)
                try:
                    client, outcome, reply, opened = self._send(client, job, opened=opened, following=following)
                except SmtpUnavailableError as error:
                    if self._last_sender_down():
                        self.fatal.append(error)
                    else:
                        log.warning("connection %d gives up, the others go on: %s", index, error)
                    for unsent in (job, following):
                        if unsent is not None:
                            self._record(_Result(unsent, "release", "", time.time(), window))
                    return
                self._record(_Result(job, outcome, reply, time.time(), window))
                held = following
        finally:
            if client is not None:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    client.close()

    def _sendable(self, job: _Job) -> bool:
        """False (and the claim released) when the run stops or the claim is too old to use."""
        if self.fatal or self.clock() - job.claimed_at > self.lease / 2:  # another run may requeue it soon
            self._record(_Result(job, "release", "", time.time()))
            return False
        return True

    def _following(self, window: threading.Semaphore) -> _Job | None:
        """The next job, if it can go right behind the current body: one is queued already, no
        rate limit to wait for, a window slot free (taken for it)."""
        if not self.limiter.unlimited or not window.acquire(blocking=False):
            return None
        while True:
            try:
                job = self.work.get_nowait()
            except queue.Empty:
                job = None
            if job is _STOP:
                self.work.put(_STOP)  # nothing is queued after the stops: put back, it still ends the run
                job = None
            if job is None:
                window.release()
                return None
            if self._sendable(job):
                return job

    def _last_sender_down(self) -> bool:
        with self.counts_lock:
            self.alive_senders -= 1
            return self.alive_senders <= 0

    def _release_queued(self) -> None:
        while True:
            try:
                job = self.work.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                self._record(_Result(job, "release", "", time.time()))

    def _record(self, result: _Result) -> None:
        """Hand a result to the recorder; wake it once a group is waiting."""
        self.results.put(result)
        if self.results.qsize() >= self.group:
            self.group_ready.set()

    def _connect(self) -> smtplib.SMTP:
        delay = 0.2
        for attempt in range(self.smtp.retry_limit + 1):
            try:
                return self.smtp.connect()
            except SmtpUnavailableError:
                raise
            except (OSError, smtplib.SMTPException) as error:
                if attempt == self.smtp.retry_limit:
                    raise SmtpUnavailableError(
                        f"cannot reach the SMTP relay {self.smtp.address} after {attempt + 1} attempts: "
                        f"{type(error).__name__}: {error}"[:300]
                    ) from None
                self.count("reconnects")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _commands(self, job: _Job) -> tuple[bytes, bytes, bytes]:
        """MAIL, RCPT, DATA; both addresses passed normalize_email: ASCII local@domain, nothing to quote."""
        envelope_from = self.envelope_from or job.rendered.envelope_from
        return (f"MAIL FROM:<{envelope_from}>\r\n".encode("ascii"),
                f"RCPT TO:<{job.rendered.envelope_to}>\r\n".encode("ascii"), b"DATA\r\n")

    def _send(self, client: smtplib.SMTP | None, job: _Job, *, opened: bool, following: _Job | None
              ) -> tuple[smtplib.SMTP | None, str, str, bool]:
        """(client to reuse, outcome, reply, whether ``following``'s commands went behind the body).
        ``opened``: ``job``'s commands went behind the previous body. Dropped connections are
        retried on a new one."""
        commands = self._commands(job)
        chained = b"".join(self._commands(following)) if following is not None else b""
        drops = 0
        while True:
            if client is None:
                client = self._connect()
                opened = False
            try:
                code, message, body_sent, chained_sent = _transaction(
                    client, commands, job.rendered.data, opened=opened, following=chained)
                reply = _reply_text(code, message)
                if code == 250 and body_sent:
                    return client, "sent", reply, chained_sent
                if code == 421:  # the server is closing this connection
                    client.close()
                    return None, "retry", reply, False
                if not body_sent:  # refused before the body: end the transaction (after it, it has ended)
                    try:
                        client.rset()
                    except smtplib.SMTPServerDisconnected:
                        client.close()
                        client = None
                return client, ("retry" if 400 <= code < 500 else "failed"), reply, chained_sent
            except (smtplib.SMTPServerDisconnected, OSError) as error:
                client.close()
                client = None
                drops += 1
                self.count("connection_drops")
                if drops > self.smtp.retry_limit:
                    return client, "retry", f"connection lost: {type(error).__name__}", False
                time.sleep(min(0.1 * 2 ** (drops - 1), 5.0))

    # -- recorder --------------------------------------------------------------------------
    def _record_loop(self) -> None:
        stop = False
        try:
            while not stop:
                batch = [self.results.get()]
                if self.group > 1 and batch[0] is not _STOP:
                    self.group_ready.wait(RECORD_LINGER)  # never hold a result longer
                self.group_ready.clear()
                while len(batch) < 5000 and batch[-1] is not _STOP:
                    try:
                        batch.append(self.results.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is _STOP for item in batch)
                items = [item for item in batch if item is not _STOP]
                if items:
                    self._commit(items)
        finally:
            if self.record_conn is not None:
                self.record_conn.close()

    def _record_connection(self) -> Any:
        """The recorder's own connection, kept for the run (a checkout pings the database)."""
        if self.record_conn is None:
            self.record_conn = self.engine.connect()
        return self.record_conn

    def _commit(self, items: list[_Result]) -> None:
        sent, closed, retry, release = [], [], [], []
        for item in items:
            job = item.job
            params = {"id": job.delivery_id, "token": self.run_token, "at": item.at, "reply": item.reply}
            if item.outcome == "sent":
                sent.append(params)
            elif item.outcome == "failed":
                closed.append({**params, "reason": "smtp_rejected"})
            elif item.outcome == "retry" and job.attempts >= self.max_attempts:
                closed.append({**params, "reason": f"gave up after {job.attempts} attempts"})
            elif item.outcome == "retry":
                retry.append(params)
            else:
                release.append(params)
        if self.database_down:  # rows stay 'sending'; a later run requeues them
            items, sent, closed, retry, release = items, [], [], [], []
        for attempt in itertools.count():
            if not (sent or closed or retry or release):
                break
            try:
                conn = self._record_connection()
                with conn.begin():
                    for outcome, params in (("sent", sent), ("failed", closed), ("retry", retry), ("release", release)):
                        if params:
                            conn.exec_driver_sql(self.record_sql[outcome], params)
                break
            except Exception as error:  # the database must come back before anything else is sent
                if self.record_conn is not None:  # a new connection for the next attempt
                    try:
                        self.record_conn.invalidate()
                        self.record_conn.close()
                    except Exception:  # noqa: BLE001 - it is being dropped anyway
                        pass
                    self.record_conn = None
                if attempt >= 5:
                    log.error("cannot record %d delivery results: %s; stopping", len(items), error)
                    self.fatal.append(error)
                    self.database_down = True
                    sent, closed, retry, release = [], [], [], []
                    break
                time.sleep(0.5 * 2 ** attempt)
        for item in items:
            if item.done is not None:
                item.done.release()
        with self.counts_lock:
            self.outstanding -= len(items)
        self.count("sent", len(sent))
        self.count("failed", len(closed))
        self.count("retried", len(retry))
        self.count("released", len(release))


def _interleave_domains(jobs: list[_Job]) -> list[_Job]:
    """Round-robin over recipient domains, so one throttled domain does not hold up the rest."""
    by_domain: dict[str, list[_Job]] = {}
    for job in jobs:
        by_domain.setdefault(job.domain, []).append(job)
    if len(by_domain) <= 1:
        return jobs
    return [job for group in itertools.zip_longest(*by_domain.values()) for job in group if job is not None]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_is_orphaned(claimed_by: str | None, claimed_at: float | None, *, lease: float, now: float) -> bool:
    """A claim whose worker is gone: lease expired, or its process on this host no longer runs."""
    if claimed_at is None or claimed_at < now - lease or not claimed_by:
        return True
    parts = claimed_by.rsplit("|", 3)
    if len(parts) != 4:
        return False
    _, host, pid, _ = parts
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return claimed_by not in _ACTIVE_RUNS
    return not _process_alive(int(pid))


def requeue_interrupted(engine: Engine, *, lease: float = 600.0, now: float | None = None) -> int:
    """Give rows left in ``sending`` by a dead worker back to ``pending``; return how many.

    At most ``window`` of them per connection of that worker had been accepted by the server:
    those are sent again (the SPEC's crash window), with the same Message-ID; the others were
    never handed to the server and are sent once.
    """
    now = time.time() if now is None else now
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT delivery_id, claimed_by, claimed_at FROM deliveries WHERE status = 'sending'")).all()
        orphans = [
            {"id": row.delivery_id, "by": row.claimed_by, "reason": f"requeued: send interrupted ({row.claimed_by})"[:500]}
            for row in rows
            if _claim_is_orphaned(row.claimed_by, row.claimed_at, lease=lease, now=now)
        ]
        if orphans:
            conn.execute(
                text("UPDATE deliveries SET status = 'pending', reason = :reason "
                     "WHERE delivery_id = :id AND status = 'sending' AND claimed_by = :by"),
                orphans,
            )
            log.warning("requeued %d deliveries left in 'sending' by interrupted workers", len(orphans))
    return len(orphans)


def deliver_pending(
    engine: Engine,
    config: TriggersConfig,
    smtp: SmtpSettings,
    *,
    templates_dir: str | os.PathLike[str],
    worker_id: str,
    connections: int = 1,
    batch_size: int = 500,
    max_messages: int | None = None,
    now: float | None = None,
    interval: tuple[float, float] | None = None,
    window: int = 16,
    lease: float = 600.0,
    retry_delay: float = 60.0,
    max_retry_delay: float = 3600.0,
    max_attempts: int = 8,
    wait_for_retries: float = 30.0,
    unsubscribe_url: str | None = None,
    render_processes: int | None = None,
) -> dict[str, int]:
    """Send every due pending delivery (of ``interval``'s events, for a backfill) and record it.

    ``connections`` SMTP connections in parallel, each reused for many messages; the rate limits
    of ``config.limits.rate``. A 4xx or a dropped connection puts the row back to ``pending`` with
    ``retry_delay * 2**(attempts-1)`` (capped) before it is due again; this run waits for retries
    due within ``wait_for_retries`` seconds and leaves later ones to the next run; after
    ``max_attempts`` claims the row is ``failed``. A 5xx is ``failed`` with the reply.
    ``window`` bounds the messages per connection accepted by the server but not yet committed
    (1 = commit each message before sending the next). Large runs render in ``render_processes``
    separate processes (default :func:`default_render_processes`; 0 = in this process), started at
    the first full batch of at least RENDER_POOL_MIN_ROWS rows. Returns the counts (sent, failed,
    retried, suppressed_<reason>, render_failed, requeued_interrupted, ...).
    Raises :class:`SmtpUnavailableError` when no connection to the relay could be made, after
    giving the unsent rows back.
    """
    if connections < 1 or window < 1 or batch_size < 1:
        raise ValueError("connections, window and batch_size must be at least 1")
    run = _Delivery(
        engine, config, smtp,
        templates_dir=Path(templates_dir), worker_id=worker_id, connections=connections, batch_size=batch_size,
        max_messages=max_messages, now=now, interval=interval, window=window, lease=lease,
        max_attempts=max_attempts, wait_for_retries=wait_for_retries, unsubscribe_url=unsubscribe_url,
        render_processes=default_render_processes() if render_processes is None else max(0, render_processes),
        backoff_sql=_backoff_case(max_attempts, retry_delay, max_retry_delay),
    )
    return run.run()


def counts_total(counts: Mapping[str, int], prefix: str) -> int:
    return sum(v for k, v in counts.items() if k.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Command line: python -m include.cli deliver
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=int(os.environ.get("TRIGGERS_SMTP_CONNECTIONS", "2")))
    parser.add_argument("--max-messages", type=int, default=None, help="stop after claiming this many")
    parser.add_argument("--worker-id", default="cli")


def main(args: argparse.Namespace) -> int:
    """Send the pending deliveries once through `smtp_default` (AIRFLOW_CONN_SMTP_DEFAULT)."""
    from airflow.sdk import BaseHook

    from include.config import Settings, load_config
    from include.database.engine import make_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    config = load_config(settings.config_path, settings.templates_dir)
    smtp = SmtpSettings.from_connection(BaseHook.get_connection(settings.smtp_conn_id))
    counts = deliver_pending(
        make_engine(settings.db_url), config, smtp, templates_dir=settings.templates_dir,
        worker_id=args.worker_id, connections=args.connections, max_messages=args.max_messages,
    )
    print(counts)
    return 0


__all__: Iterable[str] = ("SmtpSettings", "RateLimiter", "deliver_pending", "requeue_interrupted")
