"""Sending the pending deliveries over SMTP, each ``delivery_id`` at most once (SPEC sections 6, 7).

The protocol of one delivery row::

    pending --claim (one transaction per batch, attempts+1)--> sending --SMTP 250--> sent
                                                                   \\--5xx--> failed (the reply)
                                                                   \\--4xx or dropped--> pending
                                                                        (retried after a backoff;
                                                                         failed after max_attempts)
                                                                   \\--not sent, relay-wide 5xx,
                                                                        worker died--> pending
                                                                        (attempts-1: not an attempt)

``attempts`` counts relay attempts only. An error preparing one row (rendering, its data) fails
that row (``render_error: ...``); a setting every message uses is checked first (ConfigError).

One run is a coordinator (this thread, running the producer of :mod:`~include.delivery.claims`),
one sending thread per connection (:mod:`~include.delivery.sender`) and a recorder thread
(:mod:`~include.delivery.recorder`, group commit). A crash leaves rows in ``sending``: the next
run gives them back (:mod:`~include.delivery.recovery`); only the at most ``connections * window``
messages that the server had accepted are sent again, which is the window SPEC section 7
allows, and they carry the same ``Message-ID``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import Engine

from include.bounces.verp import bounce_address_template
from include.config import TriggersConfig
from include.delivery import pool
from include.delivery.claims import Producer, take_over
from include.delivery.controls import report_waiting
from include.delivery.options import DeliveryOptions
from include.delivery.ratelimit import RateLimiter
from include.delivery.recorder import Recorder
from include.delivery.recovery import registered_run
from include.delivery.render import (
    UNSUBSCRIBE_MAILTO_ENV,
    check_delivery_settings,
    check_unsubscribe_url_is_set,
    normalize_email,
    unsubscribe_url_template,
)
from include.delivery.render_pool import BatchRenderer, CampaignSpec, default_render_processes
from include.delivery.sender import Sender
from include.delivery.smtp import SmtpSession, SmtpSettings
from include.delivery.state import STOP, RunState
from include.errors import SmtpUnavailableError
from include.runtime import progress_logged
from include.staging.backlog import due_emails
from include.suppressions.unsubscribe import unsubscribe_secret

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0001  # GIL hand-over while sending: a thread whose reply arrived waits less


def delivery_renderer(
    engine: Engine,
    config: TriggersConfig,
    templates_dir: str | os.PathLike[str],
    unsubscribe_url: str | None = None,
    processes: int = 0,
) -> BatchRenderer:
    """What delivery renders rows with: the campaigns, the unsubscribe URL and its token secret.
    The previews (preview, send-test, dry run) render with it too: they show what would be sent."""
    campaigns = {c.id: CampaignSpec(c.id, c.template, c.sender) for c in config.campaigns}
    url = unsubscribe_url_template(unsubscribe_url)
    return BatchRenderer(templates_dir, url, campaigns, processes, unsubscribe_secret(engine))


def deliver_pending(
    engine: Engine, config: TriggersConfig, smtp: SmtpSettings, options: DeliveryOptions
) -> dict[str, int]:
    """Send every due pending delivery (of ``options.interval``'s events, for a backfill) and
    record it, with the rate limits of ``config.limits.rate`` (:class:`DeliveryOptions` says how).

    Returns the counts (sent, failed, retried, suppressed_<reason>, render_failed,
    requeued_interrupted, taken_over, ...). Raises :class:`ConfigError` for a setting every
    message uses (unsubscribe URL or mailto, a sender address; the placeholder unsubscribe URL
    with a relay not on loopback), before claiming anything;
    :class:`SmtpUnavailableError` when no connection to the relay could be made, and
    :class:`RelayRefusedError` (with the relay's reply) when it refuses every message, after
    giving the unsent rows back.
    """
    unsubscribe_url = unsubscribe_url_template(options.unsubscribe_url)
    processes = (
        default_render_processes() if options.render_processes is None else max(0, options.render_processes)
    )
    check_delivery_settings(
        unsubscribe_url,
        os.environ.get(UNSUBSCRIBE_MAILTO_ENV),
        {c.id: c.sender for c in config.campaigns},
        smtp.from_email,
    )
    check_unsubscribe_url_is_set(unsubscribe_url, smtp.host)
    options.check_lease(smtp.timeout)
    renderer = delivery_renderer(engine, config, options.templates_dir, unsubscribe_url, processes)
    # TRIGGERS_BOUNCE_ADDRESS (VERP), checked here before anything is claimed, wins over from_email
    verp = bounce_address_template() is not None
    envelope_from = normalize_email(smtp.from_email) if smtp.from_email and not verp else None
    first = SmtpSession(smtp, envelope_from, lambda key: None)
    options, far = _sized(options, first, config)
    with registered_run(options.worker_id) as run_token:
        state = RunState(options, run_token, far=far)
        first.count = state.count
        sessions = [first] + [
            SmtpSession(smtp, envelope_from, state.count) for _ in range(options.connections - 1)
        ]
        with progress_logged(
            log,
            "deliver",
            "messages",
            *_progress_of(state),
            total=due_emails(engine, state.clock(), options.interval),
        ):
            _coordinate(engine, config, state, renderer, sessions)
    counts = {k: v for k, v in sorted(state.counts.items()) if v}
    counts.update(report_waiting(engine, config))  # switched-off and removed campaigns' emails wait
    log.info("delivery %s: %s", options.worker_id, counts)
    if state.fatal:
        error = state.fatal[0]
        if isinstance(error, SmtpUnavailableError):
            raise type(error)(f"{error} (counts so far: {counts})") from None
        raise error
    return counts


def _sized(
    options: DeliveryOptions, first: SmtpSession, config: TriggersConfig
) -> tuple[DeliveryOptions, bool]:
    """The options with the pool and window sized (:mod:`~include.delivery.pool`) where they are
    0, from the round trip ``first`` measures (its connection is kept); whether the relay is far.
    Measured even when both are given: the first connection is opened anyway, and a far relay
    changes how results are committed (:class:`~include.delivery.state.RunState`)."""
    if first.settings.max_connections:  # the relay's own cap (smtp_default extra max_connections)
        options = replace(options, max_connections=first.settings.max_connections)
    round_trip = pool.measure(first)
    sessions = first.client is not None
    rate = config.limits.rate.per_second if config.limits.rate else None
    chosen = pool.plan(
        options,
        round_trip,
        pipelining=sessions and first.client.has_extn("pipelining"),  # type: ignore[union-attr]
        chunking=sessions and first.chunking,
        rate=rate,
    )
    log.info(
        "delivery %s: %d SMTP session(s), window %d (relay round trip %s)",
        options.worker_id,
        chosen.connections,
        chosen.window,
        "unknown" if round_trip is None else f"{round_trip * 1000:.1f} ms",
    )
    return pool.planned_options(options, chosen), chosen.far


def _progress_of(state: RunState) -> tuple[Callable[[], int], Callable[[], int | None], Callable[[], str]]:
    """What a progress line reads (counts the recorder keeps): messages done (sent or failed), left
    before ``max_messages`` (None without a cap), and those retried and in flight."""
    cap = state.options.max_messages

    def done() -> int:
        return state.counts["sent"] + state.counts["failed"]

    def remaining() -> int | None:
        return None if cap is None else cap - done()

    def detail() -> str:
        return f"{state.counts['retried']:,} retried, {state.outstanding:,} in flight"

    return done, remaining, detail


def _coordinate(
    engine: Engine,
    config: TriggersConfig,
    state: RunState,
    renderer: BatchRenderer,
    sessions: list[SmtpSession],
) -> None:
    """Start the recorder and one sender per session, produce here; on the way out, every claim
    not handed to a connection is given back and every result recorded."""
    rate = config.limits.rate
    limiter = RateLimiter(  # shared by every worker through the rate_limits table
        engine, rate.per_second if rate else None, rate.per_domain_per_second if rate else None
    )
    recorder = threading.Thread(target=Recorder(engine, state).run, name="delivery-recorder", daemon=True)
    senders = [
        threading.Thread(
            target=Sender(state, session, limiter, i).run, name=f"delivery-smtp-{i}", daemon=True
        )
        for i, session in enumerate(sessions)
    ]
    switch_interval = sys.getswitchinterval()
    if not state.far:  # far, dozens of threads wait on round trips: fast hand-overs only cost CPU
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL))
    recorder.start()
    for sender in senders:
        sender.start()
    try:
        # an error here (a deadlock with another worker's requeue) is logged: the producer tries again
        state.count("requeued_interrupted", take_over(engine, state.options.lease, state.clock()))
        Producer(engine, config, state, renderer).run()
    finally:
        for _ in senders:
            state.work.put(STOP)
        for sender in senders:
            sender.join()
        state.release_queued()  # claimed but never handed to a connection
        state.results.put(STOP)
        recorder.join()
        renderer.close()
        sys.setswitchinterval(switch_interval)


# ---------------------------------------------------------------------------------------------
# Command line: python -m include.cli deliver
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections",
        type=int,
        default=int(os.environ.get("TRIGGERS_SMTP_CONNECTIONS", "0")),
        help="SMTP sessions (default TRIGGERS_SMTP_CONNECTIONS, else 0: sized from the rate and the relay's round trip)",
    )
    parser.add_argument("--max-messages", type=int, default=None, help="stop after claiming this many")
    parser.add_argument("--worker-id", default="cli")


def main(args: argparse.Namespace) -> int:
    """Send the pending deliveries once through `smtp_default` (AIRFLOW_CONN_SMTP_DEFAULT)."""
    from include.delivery.hook import PipeliningSmtpHook
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with open_resources() as res:
        smtp = PipeliningSmtpHook(res.settings.smtp_conn_id).session_settings()
        options = DeliveryOptions(
            templates_dir=res.settings.templates_dir,
            worker_id=args.worker_id,
            connections=args.connections,
            max_messages=args.max_messages,
        )
        print(deliver_pending(res.engine, res.config, smtp, options))
    return 0
