"""How many SMTP sessions a run opens, and how many unrecorded messages each may have.

A session is bound by round trips, not CPU, when the relay is far: with PIPELINING it sends about
one message a round trip (the next message's MAIL, RCPT and DATA ride behind the current body),
with CHUNKING too about ``window`` (each message goes whole, as MAIL, RCPT, ``BDAT LAST`` and its
body, without waiting), without PIPELINING one per four round trips. :func:`plan` sizes the pool
from the configured rate (no rate: the cap) and the round trip the first connection measured (its
EHLO, then a NOOP when far), within the relay's cap (smtp_default extra ``max_connections``,
default :data:`DEFAULT_MAX_CONNECTIONS`). An explicit ``connections`` is kept as given.

The window bounds the messages a session had accepted by the relay but not yet recorded, so a
crash sends at most ``sessions * window`` messages twice. Near (loopback, a relay on the same
network: round trip under :data:`FAR_ROUND_TRIP`), 16 pays: a commit costs about as much as a
message there, and a group commit amortizes it. Far, a commit costs a small part of the round
trip: 2 (the message whose reply came, being recorded, and the next one) keeps a session busy.
"""

from __future__ import annotations

import math
import smtplib
import time
from dataclasses import dataclass, replace

from include.delivery.options import DeliveryOptions
from include.delivery.smtp import RelayBusy, SmtpSession, open_client
from include.errors import SmtpUnavailableError

FAR_ROUND_TRIP = 0.003  # seconds: past this a commit (~1 ms) is cheap beside a round trip
DEFAULT_MAX_CONNECTIONS = 32  # per relay and worker; Postfix allows 50 per client by default
NEAR_SESSIONS = 2  # near and no rate: one session is already CPU-bound, a second overlaps its waits
NEAR_WINDOW = 16
FAR_WINDOW = 2
HEADROOM = 1.25  # sessions beyond the bare need: round trips vary, commits take a little


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` chose, and from what (logged, and returned in the run's counts)."""

    connections: int
    window: int
    round_trip: float | None
    far: bool


def measure(session: SmtpSession) -> float | None:
    """Connect ``session`` (kept open for the run) and return the relay's round trip: its EHLO's,
    confirmed by a NOOP when far (the lower of both). None when it cannot connect at the first
    try: the run then goes on with one session and the near window, and its sender retries and
    reports a failure as before."""
    try:
        client = open_client(session.settings)
    except (OSError, smtplib.SMTPException, SmtpUnavailableError, RelayBusy):
        return None
    session.client = client
    round_trip = session.round_trip = getattr(client, "round_trip", None)
    if round_trip is not None and round_trip > FAR_ROUND_TRIP:
        started = time.perf_counter()
        try:
            client.noop()
        except (OSError, smtplib.SMTPException):
            return round_trip  # the sender finds the connection broken and reconnects
        round_trip = min(round_trip, time.perf_counter() - started)
    return round_trip


def messages_per_round_trip(pipelining: bool, chunking: bool, window: int, limited: bool) -> float:
    """What one session sends a round trip: under a rate limit a pipelining session does not
    chain the next message behind the body (it waits for its slot), so two round trips each."""
    if pipelining and chunking:
        return float(window)
    if pipelining:
        return 0.5 if limited else 1.0
    return 0.25


def plan(
    options: DeliveryOptions,
    round_trip: float | None,
    *,
    pipelining: bool,
    chunking: bool,
    rate: float | None,
) -> Plan:
    """The pool and window for this run (an option set by the caller is kept)."""
    far = round_trip is not None and round_trip > FAR_ROUND_TRIP
    window = options.window or (FAR_WINDOW if far else NEAR_WINDOW)
    cap = max(1, options.max_connections)
    if options.connections:
        connections = options.connections
    elif round_trip is None:
        connections = 1
    elif rate:
        per_session = messages_per_round_trip(pipelining, chunking, window, True) / max(round_trip, 1e-4)
        connections = min(cap, max(1, math.ceil(HEADROOM * rate / per_session)))
    else:
        connections = cap if far else min(cap, NEAR_SESSIONS)
    return Plan(connections, window, round_trip, far)


def planned_options(options: DeliveryOptions, chosen: Plan) -> DeliveryOptions:
    return replace(options, connections=chosen.connections, window=chosen.window)
