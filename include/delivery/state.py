"""What the producer, the sending threads and the recorder of one run share.

Claimed jobs go to the senders through ``work``; their results go to the recorder through
``results``. ``SimpleQueue``'s put and get cost a tenth of ``Queue``'s, which matters at one of
each per message. Counters change under ``lock``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from include.delivery.options import DeliveryOptions
from include.delivery.render import RenderedEmail

STOP = object()  # put on a queue: its reader ends


@dataclass(slots=True)
class Job:
    """A claimed delivery, rendered, waiting for a connection."""

    delivery_id: str
    rendered: RenderedEmail
    attempts: int
    claimed_at: float
    domain: str
    campaign_id: str = ""  # the status view's counts per campaign (recorder)


@dataclass(slots=True)
class Result:
    """What became of a job; ``done`` is the sender's window slot, freed once it is recorded."""

    job: Job
    outcome: str  # sent, failed, retry, release
    reply: str
    at: float
    done: threading.Semaphore | None = None


class RunState:
    """The shared state of one run: its clock, queues, counts and the first fatal error."""

    def __init__(self, options: DeliveryOptions, run_token: str, *, far: bool = False) -> None:
        self.options = options
        # the relay is far (pool.FAR_ROUND_TRIP): a commit is cheap beside a round trip, so results
        # are committed at once (no lingering for a group) and a session waits for its slot
        self.run_token = run_token
        self.now = options.now
        self.started = time.time()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # a commit costs about the same whatever its size: the recorder lets a group of half the
        # windows form (the senders go on meanwhile) and a sender wakes it once one has formed
        window = options.window
        self.far = far
        self.group = max(1, options.connections * window // 2) if window > 1 and not far else 1
        self.group_ready = threading.Event()
        self.fatal: list[BaseException] = []
        self.alive_senders = options.connections
        self.outstanding = 0  # claimed by this run, result not yet committed

    def clock(self) -> float:
        return time.time() if self.now is None else self.now + (time.time() - self.started)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    @property
    def stopping(self) -> bool:
        """A fatal error happened, or no connection is left to send with."""
        return bool(self.fatal) or self.alive_senders <= 0

    def record(self, result: Result) -> None:
        """Hand a result to the recorder; wake it once a group is waiting."""
        self.results.put(result)
        if self.results.qsize() >= self.group:
            self.group_ready.set()

    def release(self, job: Job, done: threading.Semaphore | None = None) -> None:
        """Give a claim back uncounted: ``job`` was never handed to the server."""
        self.record(Result(job, "release", "", time.time(), done))

    def release_queued(self) -> None:
        """Give back every job still queued for the senders."""
        while True:
            try:
                job = self.work.get_nowait()
            except queue.Empty:
                return
            if job is not STOP:
                self.release(job)

    def sender_gave_up(self) -> bool:
        """One connection fewer; True when it was the last."""
        with self.lock:
            self.alive_senders -= 1
            return self.alive_senders <= 0
