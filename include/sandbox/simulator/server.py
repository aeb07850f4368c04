"""The simulator: one stdlib HTTP server on 127.0.0.1 that answers both the IMS token endpoints and
the journal (so the connection's ``host`` and ``ims_url`` are the same base URL), with switchable
faults, the tokens it issued, and its counters.

The journal holds, per position, only a generated-event number (8 bytes) or, for ``publish_raw``,
the event's JSON text; a page of generated events is rebuilt from ``(seed, numbers)`` on demand as
one numpy byte matrix, so memory stays flat and the server serves well over 100,000 events/s on one
core. Switch faults while it runs: ``curl -d '{"status": 503, "count": 3}' URL/_sim/faults``.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from include.errors import ConfigError
from include.sandbox.simulator.handler import SimulatorHandler, SimulatorHTTPServer
from include.sandbox.simulator.journal import Journal
from include.sandbox.simulator.options import SimulatorOptions, check_options


class Faults:
    """Switchable failures of the journal endpoint; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[list[Any]] = deque()  # [status, remaining, retry_after]
        self._bodies: dict[str | None, bytes] = {}  # since -> the body sent instead of that page
        self.slow_seconds = 0.0
        self._flaky: tuple[int, float] | None = None  # (status, share of requests)
        self._chance = random.Random(0)  # seeded: a test's faults are the same every time

    def fail_next(self, status: int, count: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``count`` journal requests with ``status`` (after earlier pending faults)."""
        if count > 0:
            with self._lock:
                self._pending.append([int(status), int(count), retry_after])

    def fail_share(self, status: int, share: float) -> None:
        """Answer about ``share`` of the journal requests (at random) with ``status``; 0 stops it."""
        with self._lock:
            self._flaky = (int(status), float(share)) if share > 0 else None

    def replace_page(self, body: bytes, since: str | None = None) -> None:
        """The page after ``since`` (None: the first retained) is sent as ``body`` instead, with its
        own Link header, every time it is asked for (until ``clear``): a page a client cannot read."""
        with self._lock:
            self._bodies[since] = bytes(body)

    def page_body(self, since: str | None) -> bytes | None:
        with self._lock:
            return self._bodies.get(since)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._bodies.clear()
            self.slow_seconds = 0.0
            self._flaky = None

    def take(self) -> tuple[int, float | None] | None:
        with self._lock:
            if not self._pending and self._flaky and self._chance.random() < self._flaky[1]:
                return self._flaky[0], None
            if not self._pending:
                return None
            fault = self._pending[0]
            fault[1] -= 1
            if fault[1] <= 0:
                self._pending.popleft()
            return fault[0], fault[2]

    def describe(self) -> dict[str, Any]:
        with self._lock:
            pending = [{"status": s, "count": c, "retry_after": r} for s, c, r in self._pending]
            flaky = {"status": self._flaky[0], "share": self._flaky[1]} if self._flaky else None
        return {"pending": pending, "slow_seconds": self.slow_seconds, "flaky": flaky}


class TokenStore:
    """The access tokens issued and their expiry; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)

    def issue(self, lifetime: float) -> str:
        token = "sim." + secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._tokens) > 10_000:
                self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = now + lifetime
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_all(self) -> None:
        with self._lock:
            self._tokens.clear()


def load_public_key(pem: bytes | str) -> Any:
    """An RSA public key from a public-key PEM or a certificate PEM (what Adobe's console takes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"BEGIN CERTIFICATE" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise ConfigError(
            f"simulator: public_key_pem is not a PEM public key or certificate ({error}); "
            f"create a key pair with: python -m include.cli keys create DIR"
        ) from None


class Simulator:
    """The IMS + journal server. ``with Simulator(options) as sim: ... sim.url ...``"""

    def __init__(self, options: SimulatorOptions):
        check_options(options)
        self.options = options
        self.faults = Faults()
        self.journal = Journal(options)
        self.url = ""
        self.tokens = TokenStore()
        self.public_key = load_public_key(options.public_key_pem) if options.public_key_pem else None
        self._counters: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._journal_statuses: Counter[int] = Counter()
        self._stats_lock = threading.Lock()
        self._server: SimulatorHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._publish_lock = threading.Lock()

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Bind ``host:port`` (0: any free port), publish the start events, return the base URL.

        Only docker-compose binds another host (0.0.0.0, inside its network)."""
        if self._server is not None:
            return self.url
        self._server = SimulatorHTTPServer((host, port), SimulatorHandler)
        self._server.simulator = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        options = self.options
        if options.events > 0:
            span = max(options.time_span, 0.0)
            start = options.start_time if options.start_time is not None else time.time() - span
            self.journal.publish(options.events, start, span / options.events)
        self._stopping.clear()
        self._spawn(lambda: self._server.serve_forever(poll_interval=0.05), "simulator-http")
        if options.rate > 0:
            self._spawn(self._publish_steadily, "simulator-rate")
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], object], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _publish_steadily(self) -> None:
        rate = self.options.rate
        began = time.time()
        published = 0
        while not self._stopping.wait(0.1):
            due = int((time.time() - began) * rate) - published
            if due > 0:
                with self._publish_lock:
                    self.journal.publish(due, began + published / rate, 1.0 / rate)
                published += due

    def publish(self, n: int) -> None:
        """Append ``n`` generated events fired over the last moments (at most a minute)."""
        if n <= 0:
            return
        spread = min(60.0, n / 1000.0)
        with self._publish_lock:
            self.journal.publish(n, time.time() - spread, spread / n)

    def publish_raw(self, messages: list) -> None:
        """Append these exact event objects (any JSON value) to the journal."""
        self.journal.publish_raw([json.dumps(message, separators=(",", ":")) for message in messages])

    def publish_raw_bytes(self, texts: list[bytes]) -> None:
        """Append events as these exact bytes, sent as they are: invalid JSON, invalid UTF-8, a lone
        surrogate escape, NUL... (a hostile pipeline; the page is then not valid as a whole)."""
        self.journal.publish_raw(list(texts))

    def expire_tokens(self) -> None:
        """Every token issued so far is refused (401) from now on."""
        self.tokens.expire_all()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: responses by status (all, and of the journal), tokens issued, events served..."""
        with self._stats_lock:
            counters = dict(self._counters)
            statuses = dict(self._statuses)
            journal_statuses = dict(self._journal_statuses)
        return {
            "requests_by_status": statuses,
            "journal_requests": journal_statuses,
            "tokens_issued": counters.get("tokens_issued", 0),
            "events_served": counters.get("events_served", 0),
            "journal_length": self.journal.length,
            "first_retained": self.journal.first_retained,
        }

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter of ``stats`` (tokens_issued, events_served)."""
        with self._stats_lock:
            self._counters[name] += amount

    def count_status(self, status: int, journal: bool) -> None:
        """Count a response by status (``journal``: it answered a journal request)."""
        with self._stats_lock:
            self._statuses[status] += 1
            if journal:
                self._journal_statuses[status] += 1
