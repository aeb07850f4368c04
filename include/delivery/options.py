"""How one delivery run goes: :class:`DeliveryOptions`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from include.errors import ConfigError

RECORD_RETRY_SECONDS = 15.5  # the recorder's waits between its attempts at a commit: 0.5, 1, 2, 4, 8 s


@dataclass(frozen=True)
class DeliveryOptions:
    """The options of one :func:`~include.delivery.run.deliver_pending` call.

    ``templates_dir``: the campaigns' template sets; ``worker_id``: names the run in the rows it
    claims (the DAG passes its run id). ``connections`` SMTP sessions in parallel, each reused
    for many messages (0: sized from the rate and the relay's round trip, at most
    ``max_connections``: :mod:`~include.delivery.pool`); ``batch_size`` rows selected, re-checked and claimed together;
    ``max_messages``: stop after claiming this many. ``now``: the run's clock starts there (tests,
    reruns); ``interval``: only the deliveries of that event-time interval (a backfill run).
    ``window`` bounds the messages per connection accepted by the server but not yet committed
    (1 = commit each message before sending the next; 0: 16 for a relay on loopback or the same
    network, 2 for a far one, :mod:`~include.delivery.pool`). ``lease``: after this long, a claim whose
    worker cannot be checked is taken back. A 4xx or a dropped connection puts the row back to
    ``pending`` with ``retry_delay * 2**(attempts-1)`` (capped at ``max_retry_delay``) before it
    is due again; the run waits for retries due within ``wait_for_retries`` seconds and leaves
    later ones to the next run; after ``max_attempts`` claims the row is ``failed``.
    ``unsubscribe_url``: the URL template (default ``TRIGGERS_UNSUBSCRIBE_URL``).
    ``render_processes``: separate processes that render large runs (default
    :func:`~include.delivery.render_pool.default_render_processes`; 0 = in this process).
    ``max_same_refusals``: the same 5xx reply to this many messages in a row on one connection is
    taken as the relay refusing everything: the run stops, the claims go back (0 = never).

    ``attempts`` (the column) counts relay attempts: a claim given back unsent (the run stopped,
    the claim grew too old, the worker died) does not count, so a crash neither delays a delivery
    by the retry backoff nor uses up ``max_attempts``.
    """

    templates_dir: str | os.PathLike[str]
    worker_id: str
    connections: int = 1
    max_connections: int = 32  # pool.DEFAULT_MAX_CONNECTIONS: the cap per relay of a sized pool
    batch_size: int = 500
    max_messages: int | None = None
    now: float | None = None
    interval: tuple[float, float] | None = None
    window: int = 0
    lease: float = 600.0
    retry_delay: float = 60.0
    max_retry_delay: float = 3600.0
    max_attempts: int = 8
    wait_for_retries: float = 30.0
    unsubscribe_url: str | None = None
    render_processes: int | None = None
    max_same_refusals: int = 5

    def __post_init__(self) -> None:
        if self.connections < 0 or self.window < 0 or self.batch_size < 1 or self.max_connections < 1:
            raise ValueError(
                "connections and window must be 0 (sized) or more, batch_size and max_connections at least 1"
            )
        object.__setattr__(self, "templates_dir", Path(self.templates_dir))

    @property
    def record_retry(self) -> float:
        """Seconds the recorder spends retrying a commit before it stops the run: at most
        RECORD_RETRY_SECONDS, and at most lease/8 so that a short lease (tests) stays usable."""
        return min(RECORD_RETRY_SECONDS, self.lease / 8)

    def check_lease(self, smtp_timeout: float) -> None:
        """A body may leave with its claim just under lease/2 old; its reply may take the SMTP
        timeout and its commit the recorder's retries: all that must end before another worker
        takes the claim over (after one lease), so the lease is at least twice their sum."""
        needed = 2 * (smtp_timeout + self.record_retry)
        if self.lease < needed:
            raise ConfigError(
                f"the delivery lease (TRIGGERS_DELIVERY_LEASE / DeliveryOptions.lease) is {self.lease:g} s, "
                f"below 2 x (SMTP timeout {smtp_timeout:g} s + database retry {self.record_retry:g} s) = "
                f"{needed:g} s: a message could still be in flight when another worker takes its claim over; "
                "raise the lease, or lower smtp_default's extra timeout"
            )
