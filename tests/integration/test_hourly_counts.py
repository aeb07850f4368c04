"""The counts kept per hour (hourly_counts) by the real writers, on SQLite and PostgreSQL: staging
(hypothesis pages of anything), matching, delivery against a real SMTP server, and the one-time
rollup of the hours before counting began. Each count must agree with the rows written."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import OperationalError

from include.config import TriggersConfig
from include.database.hourly import HOUR, NO_CAMPAIGN, add_counts, hour_of
from include.database.schema import deliveries, hourly_counts, suppressions
from include.database.sql import bulk_write
from include.delivery.controls import cancel_pending
from include.delivery.options import DeliveryOptions
from include.delivery.recorder import Recorder, hourly_counts_sql
from include.delivery.state import Job, Result, RunState
from include.matching.run import match_ready_events
from include.operations.rollup import roll_up_uncounted_hours
from include.operations.status import pipeline_status
from include.sandbox.smtp_server import LocalSmtpServer
from include.staging.stager import Stager
from tests.conftest import upgrade_schema
from tests.integration.test_delivery import deliver, seed
from tests.integration.test_matching_db import CONFIG as MATCHING_CONFIG
from tests.integration.test_matching_db import T0, audience, stage
from tests.unit.test_parser_hostile import CONFIG, NOW, hostile_pages, page_of


def totals(engine: Engine) -> Counter[tuple[str, str]]:
    """(campaign_id, name) -> n, over every hour."""
    c = hourly_counts.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.campaign_id, c.name, func.sum(c.n)).group_by(c.campaign_id, c.name))
        return Counter({(campaign, name): int(n) for campaign, name, n in rows})


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=hostile_pages)
def test_staging_counts_each_page_as_stored_and_a_repeat_as_received_only(engine: Engine, items) -> None:
    table = upgrade_schema(engine, CONFIG.dimensions)
    stager = Stager(engine, CONFIG)
    page = stager.parser.parse_page(page_of(items), NOW)
    staged, refused = stager.store(page)
    stager.store(page)  # a replay: every event already staged
    with engine.begin() as conn:
        stored = conn.execute(select(func.count()).select_from(table)).scalar_one()
        conn.execute(delete(table))
    counted = totals(engine)
    with engine.begin() as conn:
        conn.execute(delete(hourly_counts))
    assert counted[(NO_CAMPAIGN, "staged")] == staged == stored
    assert counted[(NO_CAMPAIGN, "received")] == 2 * page.count
    assert counted[(NO_CAMPAIGN, "quarantined")] == 2 * (page.quarantined + refused)
    assert counted[(NO_CAMPAIGN, "ignored")] == 2 * page.ignored


def test_a_batch_rolled_back_is_not_counted(engine: Engine) -> None:
    upgrade_schema(engine, CONFIG.dimensions)
    stager = Stager(engine, CONFIG)
    page = stager.parser.parse_page(page_of([b'{"triggerId": "x"}', b"null"]), NOW)

    def crash(*_: object) -> None:
        raise RuntimeError("the process died before the commit")

    with pytest.raises(RuntimeError):
        stager.store(page, crash)
    assert totals(engine) == Counter()
    stager.store(page)
    assert totals(engine)[(NO_CAMPAIGN, "received")] == 2


def test_matching_counts_what_it_writes_and_a_rerun_adds_nothing(engine: Engine) -> None:
    audience(engine)
    stage(
        engine,
        {"id": "cart-1", "kind": "cart", "shopper": "S1", "products": ["SKU-1"], "t": T0},
        {"id": "cart-2", "kind": "cart", "shopper": "S2", "products": ["SKU-2"], "t": T0 + 60},
        {"id": "cart-3", "kind": "cart", "shopper": "S3", "products": ["SKU-3"], "t": T0 + 90},  # opted out
        {"id": "browse-2", "kind": "browse", "mc": "MC2", "t": T0 + 120},
        {"id": "cart-x", "kind": "cart", "shopper": "S404", "t": T0 + 180},
        {"id": "other-1", "kind": "other", "mc": "MC1", "t": T0 + 240},
    )
    now = T0 + 3 * HOUR
    counts = match_ready_events(engine, MATCHING_CONFIG, now=now)
    counted = totals(engine)
    with engine.connect() as conn:
        decided = Counter(
            dict(
                conn.execute(text("SELECT campaign_id, count(*) FROM deliveries GROUP BY campaign_id")).all()
            )
        )
        reasons = conn.execute(
            text(
                "SELECT campaign_id, reason, count(*) FROM deliveries WHERE reason IS NOT NULL GROUP BY 1, 2"
            )
        ).all()
    assert {campaign: counted[(campaign, "decided")] for campaign in decided} == decided
    assert {(c, f"suppressed_{r}"): n for c, r, n in reasons} == {
        key: n for key, n in counted.items() if key[1].startswith("suppressed_")
    }
    assert counted[(NO_CAMPAIGN, "matched")] == counts["matched"] and counted[(NO_CAMPAIGN, "unmatched")] == 1
    assert counted[(NO_CAMPAIGN, "processed")] == counts["ready"] == 6
    # received_at = time_gmt in these rows: decided at the run's clock, now
    assert counted[(NO_CAMPAIGN, "processing_ms")] > 0
    match_ready_events(engine, MATCHING_CONFIG, now=now + 60)
    assert totals(engine) == counted


def test_delivery_counts_sent_failed_bounced_and_retried_per_campaign(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, [{}, {"email": "gone@example.org"}, {}, {}])
    server.reject("gone@example.org")
    server.fail_next(1)
    counts = deliver(engine, config, server)
    counted = totals(engine)
    with engine.connect() as conn:
        statuses = Counter(
            dict(
                conn.execute(
                    text("SELECT campaign_id || ':' || status, count(*) FROM deliveries GROUP BY 1")
                ).all()
            )
        )
    sent = {key: n for key, n in counted.items() if key[1] == "sent"}
    assert sent == {(key.split(":")[0], "sent"): n for key, n in statuses.items() if key.endswith(":sent")}
    assert counted[("cart_abandonment", "failed")] == 1 and counted[("cart_abandonment", "bounced")] == 1
    assert sum(n for (_c, name), n in counted.items() if name == "retried") == counts["retried"] == 1
    assert sum(sent.values()) == counts["sent"]


def test_send_time_suppressions_are_counted_per_campaign(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, [{}, {"opted_out": True}, {"email": "not an address"}])
    counts = deliver(engine, config, server)
    counted = totals(engine)
    suppressed = {key: n for key, n in counted.items() if key[1].startswith("suppressed_")}
    assert suppressed == {
        ("cart_abandonment", key): n for key, n in counts.items() if key.startswith("suppressed_")
    }
    assert sum(suppressed.values()) == 2 and counted[("cart_abandonment", "sent")] == 1


def test_cancelled_emails_are_counted_per_campaign(engine: Engine, config: TriggersConfig) -> None:
    seed(engine, config, [{}, {}], campaign="retired_campaign")  # not in the configuration
    assert cancel_pending(engine, config, "retired_campaign") == 2
    assert totals(engine)[("retired_campaign", "suppressed_cancelled")] == 2


class _LostReplyOnce:
    """An engine whose first transaction commits, then loses the connection before the reply (a
    network fault that cannot be timed for real): the recorder retries a commit that happened."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.dialect, self.lost = engine, engine.dialect, False

    def connect(self):  # noqa: ANN201 - a Connection, whose begin() is wrapped
        conn = self.engine.connect()
        real_begin, fault = conn.begin, self

        @contextlib.contextmanager
        def begin():  # noqa: ANN202
            with real_begin() as transaction:
                yield transaction
            if not fault.lost:
                fault.lost = True
                raise OperationalError("COMMIT", {}, ConnectionResetError("reply lost"))

        conn.begin = begin
        return conn


def test_a_commit_whose_reply_was_lost_is_counted_once(engine: Engine, config: TriggersConfig) -> None:
    ids = seed(engine, config, [{}, {}, {}])
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'sending', claimed_by = 'run-1', claimed_at = :now, attempts = 1"
            ),
            {"now": now},
        )
    state = RunState(DeliveryOptions(templates_dir=".", worker_id="test"), "run-1")
    jobs = [Job(d, None, 1, now, "example.org", "cart_abandonment") for d in ids]  # type: ignore[arg-type]
    Recorder(_LostReplyOnce(engine), state)._commit(  # type: ignore[arg-type]
        [Result(job, "sent", "250 2.0.0 queued", now) for job in jobs]
    )
    assert totals(engine)[("cart_abandonment", "sent")] == 3
    assert state.counts["sent"] == 3 and state.counts["taken_over"] == 0


def test_a_row_another_run_took_over_is_not_counted(engine: Engine, config: TriggersConfig) -> None:
    upgrade_schema(engine, config.dimensions)
    now = time.time()
    with engine.begin() as conn:
        bulk_write(
            conn,
            deliveries,
            [
                "delivery_id",
                "campaign_id",
                "event_id",
                "event_time",
                "decided_at",
                "status",
                "attempts",
                "claimed_by",
            ],
            [
                ("mine", "c1", "e1", now, now, "sent", 1, "run-a"),
                ("taken", "c1", "e2", now, now, "sending", 2, "run-b"),  # our claim expired: run-b has it
            ],
        )
        state = SimpleNamespace(run_token="run-a")  # all the statement reads of the run
        changes = {"sent": [{"id": "mine"}, {"id": "taken"}]}
        conn.exec_driver_sql(*hourly_counts_sql(conn, changes, [], state))
    assert totals(engine) == Counter({("c1", "sent"): 1})


def test_rollup_counts_the_hours_before_counting_began_once(engine: Engine) -> None:
    """A database upgraded to 0003 with history: the rollup gives what the writers would have."""
    table = upgrade_schema(engine)
    start = hour_of(time.time()) - 5 * HOUR
    events = [
        (
            f"e{i}",
            f"p{i}",
            "customer_dev",
            "t",
            start + 60 * i,
            start + 60 * i,
            status,
            start + 60 * i + 2,
            "{}",
        )
        for i, status in enumerate(["matched", "matched", "unmatched", "ignored", "quarantined"])
    ]
    emails = [
        ("d1", "cart", "e0", start, start + 2, "sent", None, start + 10, start + 11),
        ("d2", "cart", "e1", start, start + 2, "suppressed", "opted_out", None, None),
        ("d3", "browse", "e1", start, start + 2, "failed", "smtp_rejected", start + 3600, None),
        ("d4", "browse", "e0", start, start + 2, "failed", "smtp_rejected", start + 3600, None),  # 5.1.1
    ]
    with engine.begin() as conn:
        columns = ["event_id", "position", "consumer", "trigger_id", "time_gmt", "received_at", "status"]
        bulk_write(conn, table, [*columns, "processed_at", "payload"], events)
        bulk_write(
            conn,
            deliveries,
            ["delivery_id", "campaign_id", "event_id", "event_time", "decided_at", "status", "reason"]
            + ["claimed_at", "sent_at", "attempts"],
            [(*row, 1) for row in emails],
        )
        bulk_write(
            conn,
            suppressions,
            ["email", "campaign_id", "reason", "source", "created_at"],
            [("gone@example.org", "", "hard_bounce", "d4", start + 3600)],
        )
        add_counts(conn, start + 3 * HOUR, {(NO_CAMPAIGN, "staged"): 7})  # counting began here
    assert roll_up_uncounted_hours(engine, "customer_dev") > 0
    counted = totals(engine)
    assert counted[(NO_CAMPAIGN, "staged")] == 5 + 7 and counted[(NO_CAMPAIGN, "matched")] == 2
    assert counted[(NO_CAMPAIGN, "quarantined")] == counted[(NO_CAMPAIGN, "ignored")] == 1
    assert counted[("cart", "decided")] == 2 and counted[("cart", "suppressed_opted_out")] == 1
    assert counted[("cart", "sent")] == 1 and counted[("browse", "failed")] == 2
    assert counted[("browse", "bounced")] == 1  # a hard bounce at send time, as the recorder counts it
    assert roll_up_uncounted_hours(engine, "customer_dev") == 0  # once
    assert totals(engine) == counted
    status = pipeline_status(engine, "customer_dev", days=1)
    assert status["counting_since"] == start and status["staged"]["total"] == 12
