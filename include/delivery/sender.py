"""The sending threads of one run: one per SMTP connection.

Each takes claimed jobs from the queue and sends them on its :class:`~include.delivery.smtp.SmtpSession`,
the next message's commands behind the current body when one is already queued (pipelining),
and hands each result to the recorder. Where the relay offers CHUNKING with PIPELINING, each
message goes whole (MAIL, RCPT, ``BDAT <size> LAST`` and the body) without waiting, up to
``window`` in flight, their replies read in order (:meth:`Sender._run_chunked`).

A relay that greets with 421 (too many connections) makes the session leave: the pool shrinks,
the job it held goes back uncounted; the last session waits (doubling from 0.2 s to 10 s) and
connects again. A message whose body went before a drop may have reached the relay: when no new
connection follows (a 421, or none can be made) it goes back as a retry, its attempt counted,
so a flapping relay cannot resend it forever. A message sent again after a drop takes a new
rate-limit slot; its window slot is always taken before its rate-limit slot (a rate slot
waited for behind a full window would have gone by: a burst), and once the run stops (the
database down: the recorder frees slots without writing) a job that got its slot goes back. A connection has at most ``window`` messages whose body went (so the relay may
have accepted them) and whose result is not yet committed: a slot is taken right before a body
goes and freed by the recorder. That bounds what a crash sends twice: ``connections * window``.
A claim older than half the lease is given back unsent, so that a lease expiry elsewhere can
never race a live sender: its age is checked when the job is taken and again right before its
body goes (a reconnect loop may wait).

A refusal of the relay as a whole (:func:`~include.delivery.smtp.relay_wide`, or the same 5xx
reply to ``max_same_refusals`` messages in a row) stops the run with :class:`RelayRefusedError`;
that message and every other claimed one go back to ``pending`` uncounted. The refusals of a
streak are held, not recorded, until it breaks or the run ends: if it reaches
``max_same_refusals`` they go back to ``pending`` too, so a relay refusing everything never leaves
``failed`` rows behind. A held refusal frees its window slot at once (the relay did not accept
that message) and is no result the producer waits for (it is never a retry). A refusal saying
the address is bad (5.1.1 and kin, :mod:`include.bounces.codes`) is about that message alone: it
is never part of a streak (a big provider answers every unknown address with the same text).
"""

from __future__ import annotations

import logging
import queue
import smtplib
import threading
import time
from collections import deque

from include.bounces.codes import is_hard_bounce_reply
from include.delivery.ratelimit import RateLimiter
from include.delivery.smtp import RelayBusy, SmtpSession
from include.delivery.state import STOP, Job, Result, RunState
from include.errors import RelayRefusedError, SmtpUnavailableError

log = logging.getLogger(__name__)

TOO_OLD_AGAIN = "claim too old to send again after a dropped connection"
FAR_SLOT_WAIT = 0.02  # seconds a far session waits for the commit that frees its next window slot
_DROPPED = (smtplib.SMTPServerDisconnected, OSError)


class Sender:
    """One connection's thread (:meth:`run`)."""

    def __init__(self, state: RunState, session: SmtpSession, limiter: RateLimiter, index: int) -> None:
        self.state = state
        self.session = session
        self.limiter = limiter
        self.index = index
        self.max_claim_age = state.options.lease / 2  # another run may requeue an older claim soon
        self.max_same_refusals = state.options.max_same_refusals
        self.streak: list[Result] = []  # the refusals of the current streak, same reply, held
        self.busy_delay = 0.2  # the next wait after a 421 at connect, when this is the last session

    def run(self) -> None:
        window = threading.Semaphore(self.state.options.window)
        try:
            while True:
                job = self._take(None)
                if job is None:
                    return
                try:
                    self.session.connect()
                except RelayBusy as error:
                    self.state.release(job)
                    if self._wait_busy(error):
                        continue
                    return
                except SmtpUnavailableError as error:
                    self._end_streak()
                    self._give_up(error, (job, None))
                    return
                run = self._run_chunked if self.session.chunking else self._run_pipelined
                if not run(job, window):
                    return
        finally:
            self.session.close()

    def _take(self, window: threading.Semaphore | None) -> Job | None:
        """The next sendable job, with ``window`` given its window slot acquired and then its
        rate-limit slot waited for (:meth:`_slot`); None at the end of the run."""
        while True:
            job = self.state.work.get()
            if job is STOP:
                self._end_streak()
                return None
            if self._sendable(job):
                return job if window is None or self._slot(job, window) else None

    def _slot(self, job: Job, window: threading.Semaphore, acquired: bool = False) -> bool:
        """``job``'s window slot (unless ``acquired``), then its rate-limit slot: a slot waited
        for behind a full window would have gone by, and the messages behind it go in a burst.
        False, the job given back with its slot, when the run stopped meanwhile: once the
        database is down the recorder frees slots without writing, so they bound nothing."""
        if not acquired:
            window.acquire()
        self.limiter.wait(job.domain)
        if self.state.fatal:
            self.state.release(job, window)
            return False
        return True

    def _wait_busy(self, error: RelayBusy) -> bool:
        """After a 421 at connect: False when this session leaves the pool (others go on), else
        (the last one) True once it waited to try again."""
        state = self.state
        with state.lock:
            leave = state.alive_senders > 1
            if leave:
                state.alive_senders -= 1
                state.counts["sessions_refused"] += 1
        if leave:
            log.info("connection %d leaves the pool, the relay is at its limit: %s", self.index, error)
            return False
        state.count("relay_busy_waits")
        log.warning(
            "the relay is busy (%s); the last connection tries again in %.1f s", error, self.busy_delay
        )
        time.sleep(self.busy_delay)
        self.busy_delay = min(self.busy_delay * 2, 10.0)
        return not state.fatal

    def _run_pipelined(self, job: Job, window: threading.Semaphore) -> bool:
        """Send until the end of the run (False), or a 421 at reconnect after which this session
        is the last and waited (True: :meth:`run` connects again).

        A window slot is taken right before a message's body goes (its commands may have gone
        behind the previous body without one): the slot counts what the relay may have accepted
        and we have not recorded. With a window of 2 the previous message's commit runs while
        this body travels, so a far session never waits for it."""
        state, session = self.state, self.session
        held: Job | None = job  # taken ahead (no slot yet): it goes next
        opened = False  # held's MAIL, RCPT and DATA went behind the previous body
        while True:
            if held is None:
                job = self._take(window)
                if job is None:
                    return False
            else:
                job, held = held, None
                if not self._slot(job, window):
                    return False
            following = self._following()
            try:
                sent = session.send(
                    job.rendered,
                    opened=opened,
                    following=following.rendered if following is not None else None,
                    expires=time.monotonic() + self.max_claim_age - (state.clock() - job.claimed_at),
                    pace=lambda job=job: self.limiter.wait(job.domain),
                )
            except RelayBusy as error:
                self._give_back(job, window)
                if following is not None:
                    state.release(following)
                return self._wait_busy(error)
            except SmtpUnavailableError as error:
                self._end_streak()
                self._give_back(job, window)
                self._give_up(error, (following, None))
                return False
            result = Result(job, sent.outcome, sent.reply, time.time(), window)
            if sent.outcome == "relay" or self._refusal_streak(result):
                self._stop_run(sent.reply, job, following, window)
                return False
            held, opened = following, sent.following_sent

    def _run_chunked(self, job: Job, window: threading.Semaphore) -> bool:
        """CHUNKING: each message written whole as soon as it has a window slot, the replies read
        in order. Returns as :meth:`_run_pipelined` does."""
        state, session = self.state, self.session
        inflight: deque[Job] = deque()  # written, replies not read yet
        ended = False  # no more jobs taken: the run ends or stops
        next_job: Job | None = job if self._slot(job, window) else None
        while True:
            if next_job is not None and state.clock() - next_job.claimed_at > self.max_claim_age:
                state.release(next_job, window)  # it aged waiting for its rate-limit slot: not sent
            elif next_job is not None:
                inflight.append(next_job)
                try:
                    session.write_chunked(next_job.rendered)
                except _DROPPED as error:
                    if (ending := self._rewrite(inflight, window, error)) is not None:
                        return ending
            next_job = None
            if not ended and not state.fatal:
                next_job, ended = self._take_more(window, wait=not inflight)
                if next_job is not None:
                    continue
            if not inflight:
                return False
            try:
                sent = session.read_chunked()
            except _DROPPED as error:
                if (ending := self._rewrite(inflight, window, error)) is not None:
                    return ending
                continue
            done = inflight.popleft()
            if state.fatal:  # the run stops: what the relay took is recorded, the rest goes back
                self._record_or_release(Result(done, sent.outcome, sent.reply, time.time(), window))
            else:
                result = Result(done, sent.outcome, sent.reply, time.time(), window)
                if sent.outcome == "relay" or self._refusal_streak(result):
                    self._stop_run(sent.reply, done, None, window)
            if session.client is None and inflight:  # a 421 closed it: the unanswered go again
                if (ending := self._rewrite(inflight, window, None)) is not None:
                    return ending

    def _take_more(self, window: threading.Semaphore, wait: bool) -> tuple[Job | None, bool]:
        """(job or None, ended): with nothing in flight, wait for a job; else take one only if it
        is queued and a slot frees within FAR_SLOT_WAIT (far) or at once (near)."""
        if wait:
            job = self._take(window)
            return job, job is None
        if (
            not window.acquire(timeout=FAR_SLOT_WAIT)
            if self.state.far
            else not window.acquire(blocking=False)
        ):
            return None, False
        while True:
            try:
                job = self.state.work.get_nowait()
            except queue.Empty:
                window.release()
                return None, False
            if job is STOP:
                window.release()
                self._end_streak()
                return None, True
            if self._sendable(job):
                return (job, False) if self._slot(job, window, acquired=True) else (None, True)

    def _rewrite(
        self, inflight: deque[Job], window: threading.Semaphore, error: BaseException | None
    ) -> bool | None:
        """The connection dropped with ``inflight`` unanswered: write them again on a new one
        (each drop counted, each taking a new rate-limit slot; one whose claim grew too old is
        not written again), or, past retry_limit drops in a row, record them as retries; None
        then (go on). When no connection can be made they are recorded as retries too (their
        body went: the relay may have them, so it is an attempt) and this returns what
        :meth:`_run_chunked` returns."""
        state, session = self.state, self.session
        drops = 0
        while True:
            session.drop()
            drops += 1
            state.count("connection_drops")
            if drops > session.settings.retry_limit:
                reason = f"connection lost: {type(error).__name__}" if error else "connection closed"
                for lost in inflight:
                    state.record(Result(lost, "retry", reason, time.time(), window))
                inflight.clear()
                return None
            time.sleep(min(0.1 * 2 ** (drops - 1), 5.0))
            try:
                session.connect()
                for unanswered in list(inflight):
                    self.limiter.wait(unanswered.domain)
                    if state.clock() - unanswered.claimed_at > self.max_claim_age:
                        inflight.remove(unanswered)  # as the PIPELINING path's ``expires``: not sent again
                        state.record(Result(unanswered, "retry", TOO_OLD_AGAIN, time.time(), window))
                        continue
                    session.write_chunked(unanswered.rendered)
                return None
            except _DROPPED as dropped:
                error = dropped
            except (RelayBusy, SmtpUnavailableError) as failure:
                reason = f"connection lost, then: {failure}"[:500]
                for lost in inflight:
                    state.record(Result(lost, "retry", reason, time.time(), window))
                inflight.clear()
                if isinstance(failure, RelayBusy):
                    return self._wait_busy(failure)
                self._end_streak()
                self._give_up(failure)
                return False

    def _record_or_release(self, result: Result) -> None:
        if result.outcome == "sent":
            self.state.record(result)
        else:
            self.state.release(result.job, result.done)

    def _give_back(self, job: Job, slot: threading.Semaphore | None) -> None:
        """``job`` goes back after its connection was lost: as a retry (an attempt) when its body
        went before a drop (the relay may have it: else a flapping relay resends it forever),
        else uncounted."""
        if self.session.body_went:
            reason = "connection lost after the body, and no new one"
            self.state.record(Result(job, "retry", reason, time.time(), slot))
        else:
            self.state.release(job, slot)

    def _sendable(self, job: Job) -> bool:
        """False (and the claim released) when the run stops or the claim is too old to use."""
        state = self.state
        if state.fatal or state.clock() - job.claimed_at > self.max_claim_age:
            state.release(job)
            return False
        return True

    def _refusal_streak(self, result: Result) -> bool:
        """Record ``result``, or hold it if it continues a streak of the same 5xx reply; True when
        the streak reaches max_same_refusals (the relay refuses every message)."""
        if result.outcome == "failed" and is_hard_bounce_reply(result.reply):
            self.state.record(result)  # the address is bad (5.1.1...): about this message alone
            return False
        if self.streak and (result.outcome != "failed" or result.reply != self.streak[0].reply):
            self._end_streak()
        if result.outcome != "failed" or self.max_same_refusals <= 0:
            self.state.record(result)
            return False
        if result.done is not None:
            result.done.release()
            result.done = None
        with self.state.lock:  # a held refusal is no result the producer waits for: never a retry
            self.state.outstanding -= 1
        self.streak.append(result)
        return len(self.streak) >= self.max_same_refusals

    def _take_streak(self) -> list[Result]:
        streak, self.streak = self.streak, []
        with self.state.lock:
            self.state.outstanding += len(streak)
        return streak

    def _end_streak(self) -> None:
        """The held refusals were about their own messages after all: record them."""
        for refused in self._take_streak():
            self.state.record(refused)

    def _stop_run(self, reply: str, job: Job, following: Job | None, window: threading.Semaphore) -> None:
        """Stop every connection; the unsent claims go back to pending, uncounted."""
        address = self.session.settings.address
        self.state.fatal.append(
            RelayRefusedError(
                f"the SMTP relay {address} refuses every message ({reply!r}); the claimed deliveries went "
                "back to pending: check smtp_default's login and password, from_email and the relay's "
                "sending permissions, then run again"
            )
        )
        streak = self._take_streak()
        for refused in streak:  # their window slots are free already
            self.state.release(refused.job)
        for unsent, slot in ((job, window), (following, None)):  # following has no slot yet
            if unsent is not None and all(refused.job is not unsent for refused in streak):
                self.state.release(unsent, slot)

    def _following(self) -> Job | None:
        """The next job, if its commands can go right behind the current body: one is queued
        already, no rate limit to wait for (its window slot is taken before its own body)."""
        if not self.limiter.unlimited:
            return None
        work = self.state.work
        while True:
            try:
                job = work.get_nowait()
            except queue.Empty:
                job = None
            if job is STOP:
                work.put(STOP)  # nothing is queued after the stops: put back, it still ends the run
                job = None
            if job is None:
                return None
            if self._sendable(job):
                return job

    def _give_up(
        self, error: SmtpUnavailableError, *unsent: tuple[Job | None, threading.Semaphore | None]
    ) -> None:
        """No connection could be made: the run fails if this was the last one (or the relay
        refused the login: the others would meet the same), else goes on. The ``unsent`` jobs
        go back uncounted (with the window slot each holds)."""
        if self.state.sender_gave_up() or isinstance(error, RelayRefusedError):
            self.state.fatal.append(error)
        else:
            log.warning("connection %d gives up, the others go on: %s", self.index, error)
        for job, slot in unsent:
            if job is not None:
                self.state.release(job, slot)
