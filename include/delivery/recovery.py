"""Recovery of interrupted claims: rows left in ``sending`` by a worker that is gone.

A run claims rows under a token ``worker_id|host|pid|nonce`` (:func:`registered_run`). A later
run, or a running one of another worker (every ``lease/4`` seconds, at most 30:
:class:`~include.delivery.claims.Producer`), gives a claim back to ``pending`` once its worker is
known dead (same host and its process is gone, or this process and no longer running) or its
lease expired (SPEC section 7). Worker hosts must have distinct host names: the process check
trusts a claim's host name.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

_ACTIVE_RUNS: set[str] = set()  # run tokens of deliver_pending calls running in this process


@contextmanager
def registered_run(worker_id: str) -> Iterator[str]:
    """A new run token, known in this process as running until the block ends."""
    token = f"{worker_id}|{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:12]}"
    _ACTIVE_RUNS.add(token)
    try:
        yield token
    finally:
        _ACTIVE_RUNS.discard(token)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_is_orphaned(claimed_by: str | None, claimed_at: float | None, *, lease: float, now: float) -> bool:
    """A claim whose worker is gone: lease expired, or its process on this host no longer runs."""
    if claimed_at is None or claimed_at < now - lease or not claimed_by:
        return True
    parts = claimed_by.rsplit("|", 3)
    if len(parts) != 4:
        return False
    _, host, pid, _ = parts
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return claimed_by not in _ACTIVE_RUNS
    return not _process_alive(int(pid))


def requeue_interrupted(engine: Engine, *, lease: float = 600.0, now: float | None = None) -> int:
    """Give rows left in ``sending`` by a dead worker back to ``pending``; return how many.

    At most ``window`` of them per connection of that worker had been accepted by the server:
    those are sent again (the SPEC's crash window), with the same Message-ID; the others were
    never handed to the server and are sent once. A requeued row is due at once and its claim
    does not count as an attempt (``attempts`` counts relay attempts; a crash is not one).
    """
    now = time.time() if now is None else now
    with engine.begin() as conn:
        rows = conn.execute(
            text(  # in key order: concurrent requeues lock the rows in the same order (no deadlock)
                "SELECT delivery_id, claimed_by, claimed_at FROM deliveries WHERE status = 'sending' "
                "ORDER BY delivery_id"
            )
        ).all()
        orphans = [
            {
                "id": row.delivery_id,
                "by": row.claimed_by or "",
                "at": -1.0 if row.claimed_at is None else row.claimed_at,
                "reason": f"requeued: send interrupted ({row.claimed_by})"[:500],
            }
            for row in rows
            if _claim_is_orphaned(row.claimed_by, row.claimed_at, lease=lease, now=now)
        ]
        requeued = 0
        if orphans:
            result = conn.execute(
                text(
                    # not a relay attempt: uncounted, and due at once (no retry backoff); the claim
                    # as read (a row released and claimed again since is a live claim: left alone)
                    "UPDATE deliveries SET status = 'pending', reason = :reason, claimed_at = NULL, "
                    "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
                    "WHERE delivery_id = :id AND status = 'sending' "
                    "AND COALESCE(claimed_by, '') = :by AND COALESCE(claimed_at, -1) = :at"
                ),
                orphans,
            )
            requeued = max(0, result.rowcount)  # the rows changed, summed over the parameter sets
            log.warning("requeued %d deliveries left in 'sending' by interrupted workers", requeued)
    return requeued
