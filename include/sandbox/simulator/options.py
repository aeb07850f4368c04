"""The simulator's settings, and the check that refuses those the generator cannot honour."""

from __future__ import annotations

from dataclasses import dataclass

from include.errors import ConfigError


@dataclass(frozen=True)
class SimulatorOptions:
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    org_id: str = "ABCDEF0123456789ABCDEF01@AdobeOrg"
    technical_account_id: str = "sim@techacct.adobe.com"
    public_key_pem: bytes | None = None  # JWT signatures are verified against it (RS256)
    consumer: str = "customer_dev"  # the consumer the credentials are entitled to
    token_lifetime: float = 86400.0  # seconds; the JWT exchange reports expires_in in ms, OAuth in s
    events: int = 0  # events published at start
    rate: float = 0.0  # events/s published continuously after start
    people: int = 10_000  # population size (repeat visitors)
    malformed_share: float = 0.0
    duplicate_share: float = 0.0  # share of positions that re-publish an earlier event (same ids)
    unknown_trigger_share: float = 0.05  # events of a triggerId no configuration knows
    bare_share: float = 0.0  # share in the bare trigger form of SPEC section 3
    retention: int | None = None  # keep only the newest N events; an older `since` -> 410
    start_time: float | None = None  # unix s of the first event; default now - time_span
    time_span: float = 7200.0  # the start events' trigger times spread over this many seconds
    seed: int = 1
    idle_retry_after: float = 1.0  # Retry-After of a 204 (journal drained)


def check_options(options: SimulatorOptions) -> None:
    """Refuse settings the generator cannot honour, naming the option and its range."""
    problems = [
        f"{name} must be between 0 and 1, not {getattr(options, name)}"
        for name in ("malformed_share", "duplicate_share", "unknown_trigger_share", "bare_share")
        if not 0 <= getattr(options, name) <= 1
    ]
    if options.people < 1:
        problems.append(f"people must be at least 1, not {options.people}")
    if options.events < 0 or options.rate < 0:
        problems.append("events and rate cannot be negative")
    if options.retention is not None and options.retention < 1:
        problems.append(f"retention must be at least 1 event (or None), not {options.retention}")
    if options.token_lifetime <= 0:
        problems.append(f"token_lifetime must be positive seconds, not {options.token_lifetime}")
    if options.start_time is not None and not 1e9 + 86400 <= options.start_time < 1e10 - max(
        options.time_span, 0
    ):
        problems.append(f"start_time must be unix seconds between 2001 and 2286, not {options.start_time}")
    if problems:
        raise ConfigError("simulator: " + "; ".join(problems))
