"""Delivery over several workers (the DAG's mapped ``deliver`` tasks, e.g. on the Celery executor).

Every worker is a competing claimer on the one queue of pending rows: on PostgreSQL each takes
its batches ``FOR UPDATE SKIP LOCKED`` (:mod:`~include.delivery.claims`), so the workers claim
disjoint rows; the rate limits are shared through the ``rate_limits`` table
(:mod:`~include.delivery.ratelimit`). SQLite has no row locks and one writer at a time: one
worker there (:func:`check_workers`).

A worker that dies leaves its claims in ``sending``; a live claimer takes them over once they
are orphaned (:mod:`~include.delivery.recovery`: its process is gone on this host, or the lease
expired). The mapped tasks of one DAG run are siblings (worker ids ``<run_id>#<index>``): a
sibling with nothing left to claim waits until the others' claims are done or expired, so that
the run ends with every email sent even when one worker was killed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine

from include.errors import ConfigError
from include.runtime import number_setting

WORKERS_ENV = "TRIGGERS_DELIVERY_WORKERS"
LEASE_ENV = "TRIGGERS_DELIVERY_LEASE"
DEFAULT_LEASE = 600.0
_SIBLING = "#"
# not added up: the database's state at a task's end (waiting_*), the tasks' wall time (they run at once)
_LARGEST = ("waiting_", "deliver_seconds")


def delivery_workers(environ: Mapping[str, str] = os.environ) -> int:
    """How many deliver tasks a run maps (``TRIGGERS_DELIVERY_WORKERS``, default 1)."""
    return int(number_setting(WORKERS_ENV, 1, 1, 64, whole=True, environ=environ))


def delivery_lease(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds after which a claim whose worker cannot be checked is taken over
    (``TRIGGERS_DELIVERY_LEASE``, default 600)."""
    return number_setting(LEASE_ENV, DEFAULT_LEASE, 2.0, hint=" seconds", environ=environ)


def check_workers(engine: Engine, workers: int) -> None:
    """Refuse more than one worker on SQLite (no row locks, one writer at a time)."""
    if workers > 1 and engine.dialect.name == "sqlite":
        raise ConfigError(
            f"{WORKERS_ENV} is {workers} but the database is SQLite, which has one delivery worker: "
            f"set {WORKERS_ENV}=1, or use PostgreSQL (TRIGGERS_DB_URL) to deliver with several workers"
        )


def mapped_worker_id(run_id: str, index: int) -> str:
    """The worker id of the ``index``-th deliver task of a DAG run (names its claims)."""
    return f"{run_id}{_SIBLING}{index}"


def is_mapped(worker_id: str) -> bool:
    """Whether ``worker_id`` names one of several mapped deliver tasks of a DAG run."""
    return _SIBLING in worker_id


def sibling_of(worker_id: str, claimed_by: str) -> bool:
    """Whether ``claimed_by`` (a run token ``worker_id|host|pid|nonce``) is another mapped task of
    the DAG run of ``worker_id``."""
    run_id, mark, _ = worker_id.rpartition(_SIBLING)
    if not mark:
        return False
    other = claimed_by.rsplit("|", 3)[0]
    other_run, other_mark, _ = other.rpartition(_SIBLING)
    return bool(other_mark) and other_run == run_id and other != worker_id


def share(max_messages: int | None, workers: int, index: int) -> int | None:
    """The ``index``-th worker's part of a run's cap on messages (None: no cap; 0: none left)."""
    if max_messages is None:
        return None
    return max_messages // workers + (1 if index < max_messages % workers else 0)


def merge_counts(parts: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The counts of the mapped deliver tasks as one: numbers added up (``waiting_*`` and
    ``deliver_seconds``: the largest), ``workers`` = how many reported (a task that failed reports nothing).
    None when none reported."""
    merged: dict[str, Any] = {}
    reported = 0
    for part in parts:
        if not part:
            continue
        reported += 1
        for key, value in part.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                merged.setdefault(key, value)
            elif key.startswith(_LARGEST):
                merged[key] = max(merged.get(key, 0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    if not reported:
        return None
    merged["workers"] = reported
    return merged
