"""Rate limits (SPEC section 4: ``limits.rate``): overall and per recipient domain, shared by every
worker through the ``rate_limits`` table (``*`` overall, ``@<domain>`` per domain; ``next_at`` is
the unix time of the next free slot).

Each message goes at a slot of its own: slots are ``1/per_second`` apart over all workers, and
``1/per_domain_per_second`` apart for one domain. The overall slots are reserved in blocks (one
UPDATE takes the next ``block`` slots, about 0.1 s of sending) and handed out here to the
sending threads, so the overall limit costs no round trip per message. A message to a limited
domain takes the earliest free overall slot, then claims it for its domain with one conditional
upsert (the domain's ``next_at`` moves only if it is not past that slot); when the domain is
busy, the answer says until when, and the message tries the first free slot after it. Slots are
unix times: the workers' clocks must agree (NTP). A slot not used in time is lost (the run sends
below the limit for a moment, never above it).
"""

from __future__ import annotations

import bisect
import math
import threading
import time

from sqlalchemy import Engine, text

OVERALL = "*"
BLOCK_SECONDS = 0.1  # overall slots reserved per round trip: this much sending time


class RateLimiter:
    """Strict spacing overall and per recipient domain over every worker, for the sending threads."""

    def __init__(
        self,
        engine: Engine | None,
        per_second: float | None = None,
        per_domain_per_second: float | None = None,
    ) -> None:
        self.engine = engine
        self.interval = 1.0 / per_second if per_second else 0.0
        self.domain_interval = 1.0 / per_domain_per_second if per_domain_per_second else 0.0
        self.block = max(1, math.ceil(BLOCK_SECONDS / self.interval)) if self.interval else 0
        self._free: list[float] = []  # this worker's reserved overall slots, unix times, sorted
        self._lock = threading.Lock()
        self.round_trips = 0
        # slots are unix times (shared), sleeps monotonic: one mapping, so that spacing survives it
        self._wall_offset = time.time() - time.monotonic()
        greatest = "MAX" if engine is not None and engine.dialect.name == "sqlite" else "GREATEST"
        # the next `span` seconds of slots from :start on (or from next_at, if later): one statement
        self._reserve_sql = text(
            "INSERT INTO rate_limits (key, next_at) VALUES (:key, :start + :span) "
            f"ON CONFLICT (key) DO UPDATE SET next_at = {greatest}(rate_limits.next_at, :start) + :span "
            "RETURNING next_at"
        )
        # the domain's slot at :at if it is free; the answer is the domain's next_at either way
        self._domain_sql = text(
            "INSERT INTO rate_limits (key, next_at) VALUES (:key, :at + :span) "
            "ON CONFLICT (key) DO UPDATE SET next_at = CASE WHEN rate_limits.next_at <= :at "
            "THEN :at + :span ELSE rate_limits.next_at END RETURNING next_at"
        )

    @property
    def unlimited(self) -> bool:
        return not (self.interval or self.domain_interval)

    def reserve(self, domain: str) -> float:
        """The monotonic time at which a message to ``domain`` may go (the slot is taken)."""
        if self.unlimited:
            return 0.0
        earliest = time.time()
        while True:
            at = self._overall_slot(earliest)
            if not self.domain_interval:
                break
            free_from = self._domain_slot(domain, at)
            if free_from is None:
                break
            self._give_back(at)  # the domain is busy until free_from: try a slot after it
            earliest = free_from
        return at - self._wall_offset

    def wait(self, domain: str) -> None:
        delay = self.reserve(domain) - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _overall_slot(self, earliest: float) -> float:
        """The earliest free overall slot at or after ``earliest`` (and not past), taken."""
        if not self.interval:
            return max(earliest, time.time())
        with self._lock:
            now = time.time()
            del self._free[: bisect.bisect_left(self._free, now)]  # slots gone by are lost
            index = bisect.bisect_left(self._free, earliest)
            if index == len(self._free):
                start = self._execute(
                    self._reserve_sql, OVERALL, start=max(earliest, now), span=self.block * self.interval
                )
                first = start - self.block * self.interval
                self._free.extend(first + i * self.interval for i in range(self.block))
                self._free.sort()
                index = bisect.bisect_left(self._free, earliest)
            return self._free.pop(index)

    def _give_back(self, at: float) -> None:
        if self.interval and at > time.time():
            with self._lock:
                bisect.insort(self._free, at)

    def _domain_slot(self, domain: str, at: float) -> float | None:
        """Take slot ``at`` for ``domain``: None when taken, else the time the domain is busy until."""
        span = self.domain_interval
        next_at = self._execute(self._domain_sql, f"@{domain}", at=at, span=span)
        # distinct slots differ by at least one overall interval: the row holds our value only if we set it
        if abs(next_at - (at + span)) <= min(self.interval, span) / 4 or next_at == at + span:
            return None
        return next_at

    def _execute(self, sql: object, key: str, **params: float) -> float:
        assert self.engine is not None
        with self.engine.begin() as conn:
            value = conn.execute(sql, {"key": key, **params}).scalar_one()  # type: ignore[call-overload]
        self.round_trips += 1
        return float(value)
