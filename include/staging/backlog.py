"""What waits: journal events for matching and emails for delivery, read once where a stage
starts (its progress lines say what remains) and by the report and status view (the lag).

Here, below matching, delivery and operations, so that each can read it."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, text

from include.staging.parser import IMPORTED_POSITION


def waiting_events(conn: Connection, consumer: str | None = None) -> tuple[int, float | None]:
    """How many journal events wait for matching, and when the oldest was received (None: none).

    Read per trigger from its frontier on (no index holds the status); imported events wait for
    their backfill and are not counted. One index range per trigger, whatever the size of the
    table: the subqueries are correlated because both planners, given a join, scan the whole
    table instead (they do not know the frontier sits near its end).
    """
    waiting = (
        "FROM pipeline_events e WHERE e.trigger_id = f.trigger_id AND e.time_gmt >= f.low_time "
        f"AND e.status = 'new' AND e.position <> '{IMPORTED_POSITION}'"
    )
    params = {}
    if consumer is not None:
        waiting += " AND e.consumer = :consumer"
        params["consumer"] = consumer
    sql = (
        "SELECT COALESCE(sum(n), 0), min(oldest) FROM (SELECT "
        # "+ 0": else PostgreSQL reads min() down the received_at index from the oldest event on
        f"(SELECT count(*) {waiting}) AS n, (SELECT min(e.received_at + 0) {waiting}) AS oldest "
        "FROM matching_frontier f) AS per_trigger"
    )
    count, oldest = conn.execute(text(sql), params).one()
    return int(count), None if oldest is None else float(oldest)


def events_to_match(engine: Engine, interval: tuple[float, float] | None) -> int | None:
    """The events a match run starts with: those waiting (None for a backfill's interval, whose
    events are not counted there)."""
    if interval is not None:
        return None
    with engine.connect() as conn:
        return waiting_events(conn)[0]


def due_emails(engine: Engine, now: float, interval: tuple[float, float] | None = None) -> int:
    """Pending emails whose send time has come (``not_before`` passed), of ``interval``'s events
    if given: what a delivery run starts with. An upper bound: switched-off campaigns' emails and
    retries still backing off are counted. A range of the status index, not a table scan."""
    sql = "SELECT count(*) FROM deliveries d WHERE d.status = 'pending' AND (d.not_before IS NULL OR d.not_before <= :now)"
    params: dict[str, float] = {"now": now}
    if interval is not None:
        sql += " AND d.event_time >= :start AND d.event_time < :end"
        params.update(start=interval[0], end=interval[1])
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())
