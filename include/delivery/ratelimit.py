"""Rate limits (SPEC section 4: ``limits.rate``): overall and per recipient domain."""

from __future__ import annotations

import threading
import time


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
