"""The sending threads of one run: one per SMTP connection.

Each takes claimed jobs from the queue and sends them on its :class:`~include.delivery.smtp.SmtpSession`,
the next message's commands behind the current body when one is already queued (pipelining),
and hands each result to the recorder. A connection has at most ``window`` messages whose result
is not yet committed (a window slot is freed by the recorder). A claim older than half the lease
is given back unsent, so that a lease expiry elsewhere can never race a live sender: its age is
checked when the job is taken and again right before its body goes (a reconnect loop may wait).

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
import threading
import time

from include.bounces.codes import is_hard_bounce_reply
from include.delivery.ratelimit import RateLimiter
from include.delivery.smtp import SmtpSession
from include.delivery.state import STOP, Job, Result, RunState
from include.errors import RelayRefusedError, SmtpUnavailableError

log = logging.getLogger(__name__)


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

    def run(self) -> None:
        state, session = self.state, self.session
        window = threading.Semaphore(state.options.window)
        held: Job | None = None  # taken ahead, its window slot acquired: it goes next
        opened = False  # held's MAIL, RCPT and DATA went behind the previous body
        try:
            while True:
                if held is None:
                    job = self.state.work.get()
                    if job is STOP:
                        self._end_streak()
                        return
                    if not self._sendable(job):
                        continue
                    window.acquire()
                    self.limiter.wait(job.domain)
                else:
                    job, held = held, None
                following = self._following(window)
                try:
                    sent = session.send(
                        job.rendered,
                        opened=opened,
                        following=following.rendered if following is not None else None,
                        expires=time.monotonic() + self.max_claim_age - (state.clock() - job.claimed_at),
                    )
                except SmtpUnavailableError as error:
                    self._end_streak()
                    self._give_up(error, job, following, window)
                    return
                result = Result(job, sent.outcome, sent.reply, time.time(), window)
                if sent.outcome == "relay" or self._refusal_streak(result):
                    self._stop_run(sent.reply, job, following, window)
                    return
                held, opened = following, sent.following_sent
        finally:
            session.close()

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
        for unsent in (job, following):
            if unsent is not None and all(refused.job is not unsent for refused in streak):
                self.state.release(unsent, window)

    def _following(self, window: threading.Semaphore) -> Job | None:
        """The next job, if it can go right behind the current body: one is queued already, no
        rate limit to wait for, a window slot free (taken for it)."""
        if not self.limiter.unlimited or not window.acquire(blocking=False):
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
                window.release()
                return None
            if self._sendable(job):
                return job

    def _give_up(
        self, error: SmtpUnavailableError, job: Job, following: Job | None, window: threading.Semaphore
    ) -> None:
        """No connection could be made: the run fails if this was the last one (or the relay
        refused the login: the others would meet the same), else goes on."""
        if self.state.sender_gave_up() or isinstance(error, RelayRefusedError):
            self.state.fatal.append(error)
        else:
            log.warning("connection %d gives up, the others go on: %s", self.index, error)
        for unsent in (job, following):
            if unsent is not None:
                self.state.release(unsent, window)
