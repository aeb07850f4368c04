"""Delivery over several workers on one queue (issue 16): competing claimers on PostgreSQL
(``FOR UPDATE SKIP LOCKED``), rate limits shared through the ``rate_limits`` table, a dead
sibling's claims taken over after the lease, and SQLite held to one worker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from include.config import DEFAULT_TEMPLATES_DIR, RateLimits, TriggersConfig
from include.database.engine import make_engine
from include.delivery.claims import Producer, take_over
from include.delivery.options import DeliveryOptions
from include.delivery.ratelimit import RateLimiter
from include.delivery.scaleout import (
    check_workers,
    delivery_lease,
    delivery_workers,
    mapped_worker_id,
    merge_counts,
    share,
    sibling_of,
)
from include.delivery.state import RunState
from include.errors import ConfigError
from include.sandbox.smtp_server import LocalSmtpServer
from tests.conftest import ROOT, new_database_url, upgrade_schema
from tests.integration.test_delivery import deliver, received_ids, rows, seed

WORKER = textwrap.dedent(
    """
    import json, sys
    from types import SimpleNamespace
    from include.config import DEFAULT_TEMPLATES_DIR, RateLimits, load_config
    from include.database.engine import make_engine
    from include.delivery.hook import PipeliningSmtpHook
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    url, port, rate, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    config = load_config(None, DEFAULT_TEMPLATES_DIR)
    limits = RateLimits(**rate) if rate else None
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"rate": limits})})
    smtp = PipeliningSmtpHook.for_connection(SimpleNamespace(host="127.0.0.1", port=port, login=None, password=None,
                                             extra_dejson={"disable_ssl": True, "disable_tls": True})).session_settings()
    counts = deliver_pending(make_engine(url), config, smtp, DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR,
                             **options))
    print(json.dumps(counts))
    """
)

SLOTS = textwrap.dedent(
    """
    import json, sys, threading, time
    from include.database.engine import make_engine
    from include.delivery.ratelimit import RateLimiter
    url, rate, per_domain, domains, start = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(","), float(sys.argv[5])
    limiter = RateLimiter(make_engine(url), rate, per_domain or None)
    slots = []
    def send(mine):
        for domain in mine:
            at = limiter.reserve(domain) + limiter._wall_offset  # the slot, as a unix time
            slots.append((domain, at))
    time.sleep(max(0.0, start - time.time()))  # both processes begin together
    threads = [threading.Thread(target=send, args=(domains[i::4],)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"slots": slots, "round_trips": limiter.round_trips}))
    """
)


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database: several workers on one queue need row locks."""
    yield from new_database_url("postgresql", tmp_path)


def start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def people(n: int, domains: list[str]) -> list[dict[str, Any]]:
    return [{"email": f"person{i}@{domains[i % len(domains)]}"} for i in range(n)]


@pytest.mark.slow
@pytest.mark.postgres
def test_three_claimers_on_postgresql_claim_disjoint_rows_and_send_each_once(
    pg_url: str, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    engine = make_engine(pg_url)
    ids = seed(engine, config, people(1500, ["example.org", "example.net", "example.com"]))
    server.faults.delay = 0.002  # the workers overlap for a while
    options = {"connections": 2, "window": 2, "batch_size": 100, "retry_delay": 0.05}
    workers = [
        start(WORKER, pg_url, str(server.port), "null", json.dumps({**options, "worker_id": f"w{i}"}))
        for i in range(3)
    ]
    counts = [result(w) for w in workers]
    received = received_ids(server)
    assert set(received) == set(ids) and max(received.values()) == 1  # every row once
    assert all(c.get("lost_claim_race", 0) == 0 for c in counts)  # nobody claimed a row another took
    assert sum(c["sent"] for c in counts) == len(ids) and all(c["sent"] > 0 for c in counts), counts
    assert {r.status for r in rows(engine).values()} == {"sent"}
    engine.dispose()


@pytest.mark.postgres
def test_concurrent_claim_batches_are_disjoint_and_skip_locked_rows(
    pg_url: str, config: TriggersConfig
) -> None:
    """Claims made while another claimer holds its rows locked skip them instead of waiting."""
    from include.delivery.claims import Producer
    from include.delivery.options import DeliveryOptions
    from include.delivery.state import RunState

    engine = make_engine(pg_url)
    ids = seed(engine, config, people(300, ["example.org"]))

    def producer(name: str) -> Producer:
        state = RunState(DeliveryOptions(templates_dir=".", worker_id=name, connections=1, window=1), name)
        return Producer(engine, config, state, renderer=None)  # type: ignore[arg-type]

    first, second = producer("a"), producer("b")
    with engine.begin() as conn:  # a claimer mid-transaction: its 100 rows are locked
        locked = conn.execute(
            text(
                "SELECT delivery_id FROM deliveries ORDER BY decided_at, event_time, delivery_id "
                "LIMIT 100 FOR UPDATE"
            )
        ).scalars()
        locked = set(locked)
        started = time.monotonic()
        taken = {row["delivery_id"] for row in first._claim_due(150)}
        assert time.monotonic() - started < 5  # skipped, not waited for
    assert not taken & locked and len(taken) == 150
    rest = {row["delivery_id"] for row in second._claim_due(500)}
    assert not rest & taken and rest | taken == set(ids)
    engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_rate_limit_overall_and_per_domain(
    pg_url: str, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    engine = make_engine(pg_url)
    # one busy domain (bound by its own limit) and seven quiet ones (the overall limit binds)
    domains = ["busy.example"] + [f"d{i}.example" for i in range(6)]
    ids = seed(engine, config, people(140, domains))
    rate = {"per_second": 40.0, "per_domain_per_second": 8.0}
    options = {"connections": 6, "window": 2, "batch_size": 10}  # claims a little ahead: both send
    workers = [
        start(
            WORKER, pg_url, str(server.port), json.dumps(rate), json.dumps({**options, "worker_id": f"w{i}"})
        )
        for i in range(2)
    ]
    counts = [result(w) for w in workers]
    assert all(c.get("sent", 0) > 14 for c in counts), counts  # both workers sent
    assert set(received_ids(server)) == set(ids)
    times = sorted(m.received_at for m in server.messages)
    busy = sorted(m.received_at for m in server.messages if m.rcpt_tos[0].endswith("@busy.example"))
    # over 40 messages (a second): a send lands tens of ms after its slot on a busy 2-core machine
    overall, per_domain = fastest_rate(times, 40), fastest_rate(busy, 8)
    whole = (len(times) - 1) / (times[-1] - times[0])
    print(
        f"fastest overall {overall:.1f}/s, whole run {whole:.1f}/s (limit 40), busy domain {per_domain:.1f}/s (limit 8)"
    )
    # per-process limits would allow twice as much: 80/s and 16/s
    assert whole <= 40 * 1.05 and overall <= 40 * 1.15 and per_domain <= 8 * 1.15
    engine.dispose()


def fastest_rate(times: list[float], span: int) -> float:
    """The highest rate over any ``span`` consecutive messages (receipt times at the server)."""
    return max((span - 1) / (times[i + span - 1] - times[i]) for i in range(len(times) - span + 1))


@pytest.mark.postgres
@pytest.mark.parametrize("per_domain", [0.0, 25.0])
def test_slots_reserved_by_two_processes_are_spaced_overall_and_per_domain(pg_url: str, per_domain) -> None:
    upgrade_schema(make_engine(pg_url))
    rate, messages = 200.0, 100  # per process
    domains = ",".join(["a.example", "b.example", "a.example", "c.example"] * (messages // 4))
    at = str(time.time() + 3)  # after both have started
    processes = [start(SLOTS, pg_url, str(rate), str(per_domain), domains, at) for _ in range(2)]
    found = [result(p) for p in processes]
    slots = [tuple(s) for f in found for s in f["slots"]]
    assert len(slots) == 2 * messages
    every = sorted(t for _, t in slots)
    gaps = [b - a for a, b in zip(every, every[1:], strict=False)]
    assert min(gaps) >= 1 / rate - 1e-6  # one slot at a time over both processes
    by_domain: dict[str, list[float]] = defaultdict(list)
    for domain, t in slots:
        by_domain[domain].append(t)
    if per_domain:
        for times in by_domain.values():
            times.sort()
            assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 1 / per_domain - 1e-6
    else:  # blocks of slots: far fewer round trips than messages
        assert all(f["round_trips"] <= len(f["slots"]) / 5 for f in found), [f["round_trips"] for f in found]


def test_the_limiter_spaces_slots_overall_and_per_domain_in_one_process(engine: Engine) -> None:
    upgrade_schema(engine)
    limiter = RateLimiter(engine, per_second=100, per_domain_per_second=10)
    gmail = [limiter.reserve("gmail.com") for _ in range(3)]
    other = limiter.reserve("yahoo.fr")
    assert all(b - a >= 0.1 - 1e-6 for a, b in zip(gmail, gmail[1:], strict=False))  # 10/s for one domain
    assert other < gmail[-1]  # a quiet domain does not wait behind a busy one
    assert all(abs(other - t) >= 0.01 - 1e-6 for t in gmail)  # but keeps the overall 100/s
    assert RateLimiter(None).unlimited and RateLimiter(None).reserve("x") == 0.0


def test_a_dead_siblings_claims_are_taken_over_after_the_lease_within_the_run(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, people(40, ["example.org"]))
    dead = f"{mapped_worker_id('run-1', 1)}|another-host|4242|0123456789ab"  # cannot be checked: lease
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'sending', claimed_by = :by, claimed_at = :at, attempts = 1 "
                "WHERE delivery_id IN (SELECT delivery_id FROM deliveries ORDER BY delivery_id LIMIT 10)"
            ),
            {"by": dead, "at": time.time()},
        )
    started = time.monotonic()
    counts = deliver(
        engine,
        config,
        server,
        worker_id=mapped_worker_id("run-1", 0),
        lease=3.0,
        connections=2,
        smtp_timeout=1.0,
    )
    assert time.monotonic() - started >= 2.5  # it waited for the lease
    assert counts["sent"] == 40 and counts["requeued_interrupted"] == 10
    assert Counter(received_ids(server)) == Counter(dict.fromkeys(ids, 1))
    assert {r.attempts for r in rows(engine).values()} == {1}  # the dead claim was no attempt


def test_another_runs_claims_that_expire_later_are_left_to_a_later_run(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, people(10, ["example.org"]))
    other = "cli|another-host|4242|0123456789ab"
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'sending', claimed_by = :by, claimed_at = :at WHERE delivery_id = 'd00000'"
            ),
            {"by": other, "at": time.time()},
        )
    started = time.monotonic()
    counts = deliver(
        engine, config, server, worker_id=mapped_worker_id("run-2", 0), lease=60.0, smtp_timeout=5.0
    )
    assert counts["sent"] == 9 and time.monotonic() - started < 20


def test_sqlite_refuses_more_than_one_worker_naming_the_setting(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    check_workers(engine, 1)
    with pytest.raises(ConfigError, match="TRIGGERS_DELIVERY_WORKERS=1.*PostgreSQL"):
        check_workers(engine, 2)
    with pytest.raises(ConfigError, match="TRIGGERS_DELIVERY_WORKERS is 'two'"):
        delivery_workers({"TRIGGERS_DELIVERY_WORKERS": "two"})
    with pytest.raises(ConfigError, match="TRIGGERS_DELIVERY_LEASE is '0'"):
        delivery_lease({"TRIGGERS_DELIVERY_LEASE": "0"})
    assert delivery_workers({}) == 1 and delivery_lease({}) == 600.0


def test_a_lease_too_short_for_a_reply_and_a_commit_is_refused_before_anything_is_claimed(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    seed(engine, config, people(2, ["example.org"]))
    # 2 x (30 s SMTP timeout + 7.5 s of commit retries) = 75 s: a 60 s lease could expire mid-flight
    with pytest.raises(
        ConfigError, match=r"TRIGGERS_DELIVERY_LEASE.*is 60 s.*SMTP timeout 30 s.*retry 7.5 s"
    ):
        deliver(engine, config, server, lease=60.0)
    assert {r.status for r in rows(engine).values()} == {"pending"} and not server.messages
    assert deliver(engine, config, server, lease=60.0, smtp_timeout=22.5)["sent"] == 2  # 2 x (22.5 + 7.5)


@given(st.one_of(st.none(), st.integers(1, 10_000)), st.integers(1, 64))
def test_a_runs_message_cap_is_split_over_its_workers(cap: int | None, workers: int) -> None:
    parts = [share(cap, workers, i) for i in range(workers)]
    if cap is None:
        assert parts == [None] * workers
    else:
        assert sum(parts) == cap and max(parts) - min(parts) <= 1  # type: ignore[type-var, arg-type]


def test_mapped_tasks_are_siblings_and_their_counts_merge() -> None:
    me = mapped_worker_id("scheduled__2026-01-01", 0)
    assert sibling_of(me, f"{mapped_worker_id('scheduled__2026-01-01', 3)}|h|1|n")
    assert not sibling_of(me, f"{me}|h|1|n") and not sibling_of(me, "cli|h|1|n")
    assert not sibling_of(me, f"{mapped_worker_id('manual__x', 1)}|h|1|n")
    merged = merge_counts([{"sent": 3, "waiting_disabled": 5}, None, {"sent": 4, "waiting_disabled": 5}])
    assert merged == {"sent": 7, "waiting_disabled": 5, "workers": 2}
    assert merge_counts([None]) is None


def test_a_takeover_that_fails_is_logged_and_tried_again_later_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/fix16_none?connect_timeout=2")
    with caplog.at_level(logging.WARNING, "include.delivery.claims"):
        assert take_over(unreachable, 600.0, time.time()) == 0
    assert "tried again later" in caplog.text
    unreachable.dispose()


def test_the_claims_queued_ahead_under_a_rate_are_shared_by_the_workers(
    engine: Engine, config: TriggersConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim older than lease/2 is given back unsent: each worker claims ahead its share of
    lease/8 of sending at the shared rate, not the whole of it."""
    limited = config.model_copy(
        update={"limits": config.limits.model_copy(update={"rate": RateLimits(per_second=10)})}
    )
    options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="w", connections=1, window=2)
    ahead = {}
    for workers in (1, 4):
        monkeypatch.setenv("TRIGGERS_DELIVERY_WORKERS", str(workers))
        ahead[workers] = Producer(engine, limited, RunState(options, "t"), None).queue_ahead  # type: ignore[arg-type]
    assert ahead == {1: 750, 4: 187}  # 10/s x 600 s / 8, over 1 or 4 workers
