"""The decision writer: a batch's decisions and its events' statuses, one transaction, in order.

Decisions are written with ``ON CONFLICT DO NOTHING`` under a stable ``delivery_id`` (campaign,
recipient, event), in the same transaction that marks their events ``matched`` (a delivery row,
pending or suppressed) or ``unmatched``. Once batches are large, a second process commits them
while the next one is decided (:class:`BatchWriter`).
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, text

from include.database.hourly import NO_CAMPAIGN, SUPPRESSED, add_counts
from include.database.schema import deliveries
from include.database.sql import bulk_write, in_list, list_param, row_address_in
from include.matching.decisions import delivery_ids
from include.runtime import collector_paused, spawn_pool

DELIVERY_COLUMNS = (
    "delivery_id",
    "campaign_id",
    "recipient_id",
    "email",
    "event_id",
    "event_time",
    "decided_at",
    "status",
    "reason",
    "attempts",
)
log = logging.getLogger(__name__)


def write_batch(conn: Connection, events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float) -> None:
    """The batch's decisions and its events' statuses, in ``conn``'s transaction."""
    bulk_write(conn, deliveries, DELIVERY_COLUMNS, _delivery_rows(decisions, decided_at), conflict="nothing")
    matched = events["event_id"].isin(decisions["event_id"]).to_numpy(dtype=bool)
    _mark_events(conn, events[matched], "matched", decided_at)
    _mark_events(conn, events[~matched], "unmatched", decided_at)
    add_counts(conn, decided_at, batch_counts(events, decisions, matched, decided_at))


def batch_counts(
    events: pd.DataFrame, decisions: pd.DataFrame, matched: np.ndarray, decided_at: float
) -> dict[tuple[str, str], int]:
    """The batch's counts for the status view (hourly_counts): events matched and unmatched,
    their processing time in ms, and per campaign its decisions and suppressions by reason."""
    counts = {(NO_CAMPAIGN, "matched"): int(matched.sum()), (NO_CAMPAIGN, "unmatched"): int((~matched).sum())}
    if "received_at" in events:
        waited = decided_at - events["received_at"].to_numpy(dtype=float)
        counts[(NO_CAMPAIGN, "processed")] = len(events)
        counts[(NO_CAMPAIGN, "processing_ms")] = int(round(float(waited.sum()) * 1000))
    for campaign, number in decisions["campaign_id"].value_counts().items():
        counts[(str(campaign), "decided")] = int(number)
    suppressed = decisions[decisions["reason"].notna().to_numpy(dtype=bool)]
    for (campaign, reason), number in suppressed.groupby(["campaign_id", "reason"]).size().items():
        counts[(str(campaign), f"{SUPPRESSED}{reason}")] = int(number)
    return counts


def _mark_events(conn: Connection, events: pd.DataFrame, status: str, at: float) -> None:
    """Set the events' status, by row address when read with one (``row_key``), else by event_id.

    A row updated by someone else since it was read has moved (PostgreSQL) and is missed by its
    address: the events still ``new`` then are marked by event_id.
    """
    if events.empty:
        return
    statement = "UPDATE pipeline_events SET status = :status, processed_at = :at WHERE "
    params: dict[str, Any] = {"status": status, "at": at}
    if "row_key" in events:
        keys = list_param(conn, events["row_key"].tolist())
        where = row_address_in(conn, "keys") + " AND status = 'new'"
        marked = conn.execute(text(statement + where), {**params, "keys": keys})
        if marked.rowcount == len(events):
            return
    where = f"{in_list(conn, 'event_id', 'ids')} AND status = 'new'"
    conn.execute(text(statement + where), {**params, "ids": list_param(conn, events["event_id"].tolist())})


def _delivery_rows(decisions: pd.DataFrame, decided_at: float) -> list[tuple[Any, ...]]:
    columns = []
    for name in DELIVERY_COLUMNS:
        if name == "delivery_id":  # hashed by the writer: the deciding process is the slower one
            columns.append(
                delivery_ids(decisions["campaign_id"], decisions["recipient_id"], decisions["event_id"])
            )
        elif name == "decided_at":
            columns.append([decided_at] * len(decisions))
        elif name == "attempts":
            columns.append([0] * len(decisions))
        elif name == "event_time":
            columns.append(decisions[name].to_numpy(dtype=float).tolist())
        elif name in ("recipient_id", "email", "reason"):  # the columns that can be missing
            values = decisions[name].to_numpy(dtype=object)
            columns.append(np.where(pd.isna(values), None, values).tolist())
        else:
            columns.append(decisions[name].to_numpy(dtype=object).tolist())
    return list(zip(*columns, strict=True))


class BatchWriter:
    """Commits each batch (decisions and statuses, one transaction) in order, from a second
    process once a batch is full, while the next batch is decided: the database's work overlaps
    pandas'. A thread would wait for the GIL at every row SQLite writes and at every part psycopg
    copies (measured: PostgreSQL 71 -> 60 s at 1M events with a process). At most two batches
    wait; the first error stops the writes and is raised to the caller."""

    PROCESS_MIN_EVENTS = 20_000  # a full batch this large pays for starting a process (~1 s)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.process: ProcessPoolExecutor | None = None
        self.written: deque[Future[None]] = deque()
        self.may_spawn = engine.url.database not in (None, "", ":memory:")  # another process sees the file

    def submit(self, events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float, full: bool) -> None:
        self._raise()
        if full and len(events) >= self.PROCESS_MIN_EVENTS and self.process is None and self.may_spawn:
            self._start_process()
        if self.process is None:
            with self.engine.begin() as conn:
                write_batch(conn, events, decisions, decided_at)
            return
        while len(self.written) >= 2:
            self._settle(self.written.popleft())
        batch = events[[c for c in ("event_id", "row_key", "received_at") if c in events]]
        self.written.append(self.process.submit(_write_in_process, batch, decisions, decided_at))

    def close(self) -> None:
        if self.process is not None:
            while self.written:
                self._settle(self.written.popleft())
            self.process.shutdown()
        self._raise()

    def _start_process(self) -> None:
        url = self.engine.url.render_as_string(hide_password=False)
        try:
            self.process = spawn_pool(1, _start_writer_process, (url,))
        # e.g. a daemonic process may not have children
        except (OSError, AssertionError, ValueError) as error:
            log.warning(
                "matching writes in this process: cannot start a writer process (%s)", type(error).__name__
            )
            self.may_spawn = False

    def _settle(self, written: Future[None]) -> None:
        try:
            written.result()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
            self.error = self.error or error

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


# the writer process's side: module-level functions, which the spawned process imports by name
_WRITER_ENGINE: list[Engine] = []  # the writer process's engine
_WRITER_FAILED: list[BaseException] = []  # its first failed write: the later batches are refused


def _start_writer_process(url: str) -> None:
    from include.database.engine import make_engine

    _WRITER_ENGINE.append(make_engine(url))


def _write_in_process(events: pd.DataFrame, decisions: pd.DataFrame, decided_at: float) -> None:
    if _WRITER_FAILED:  # batches commit in order or not at all
        raise RuntimeError(f"an earlier batch was not written: {_WRITER_FAILED[0]}")
    try:
        with collector_paused(), _WRITER_ENGINE[0].begin() as conn:
            write_batch(conn, events, decisions, decided_at)
    except BaseException as error:
        _WRITER_FAILED.append(error)
        raise
