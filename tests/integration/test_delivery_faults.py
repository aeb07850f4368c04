"""Delivery under faults (issue 12), against the local SMTP server on SQLite and PostgreSQL: one bad
row fails alone, a relay-wide refusal gives the claims back, a claim is never used once it could
have been taken over, and a crash is not a failed attempt."""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, text

from include.config import DEFAULT_TEMPLATES_DIR, TriggersConfig
from include.delivery.options import DeliveryOptions
from include.delivery.recovery import requeue_interrupted
from include.delivery.run import deliver_pending
from include.errors import ConfigError, RelayRefusedError, SmtpUnavailableError
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import (  # noqa: F401 (fixtures)
    KILLED_WORKER,
    ROOT,
    deliver,
    received_ids,
    rows,
    seed,
    settings_of,
    smtp_settings,
)

TAKEN_OVER = "other-run|elsewhere|1|abcdef"


def statuses(engine: Engine) -> Counter[str]:
    return Counter(r.status for r in rows(engine).values())


def dead_worker_token() -> str:
    """A claim token of a process of this host that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return f"dead|{socket.gethostname()}|{int(ended.stdout)}|0123456789ab"


def in_background(run: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["counts"] = run()
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def take_over(engine: Engine) -> None:
    """What another run does once the lease expired: requeue and claim the row as its own."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE deliveries SET claimed_by = :by, claimed_at = :at WHERE status = 'sending'"),
            {"by": TAKEN_OVER, "at": time.time()},
        )


# -- one row fails, not the batch ---------------------------------------------------------------
def test_a_row_whose_event_time_cannot_be_rendered_fails_alone(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {}, {}, {}])
    nan = float("nan") if engine.dialect.name == "postgresql" else -1e20  # SQLite stores NaN as NULL
    bad = {ids[1]: 1e20, ids[2]: nan}
    with engine.begin() as conn:
        for delivery_id, value in bad.items():
            conn.execute(
                text("UPDATE deliveries SET event_time = :t WHERE delivery_id = :d"),
                {"t": value, "d": delivery_id},
            )
    counts = deliver(engine, config, server)
    assert counts == {"sent": 2, "render_failed": 2}
    state = rows(engine)
    for delivery_id in bad:
        assert state[delivery_id].status == "failed"
        assert state[delivery_id].reason.startswith("render_error: ")
    assert state[ids[0]].status == state[ids[3]].status == "sent"


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"unsubscribe_url": "https://shop.example/u?d={delivery}"}, "TRIGGERS_UNSUBSCRIBE_URL"),
        ({"unsubscribe_url": "https://shop.example/u?d={delivery_id}&x=a b"}, "TRIGGERS_UNSUBSCRIBE_URL"),
        ({"mailto": "not an address"}, "TRIGGERS_UNSUBSCRIBE_MAILTO"),
        ({"sender": "Shop <no-at-sign>"}, "campaign 'cart_abandonment' sender"),
    ],
)
def test_a_setting_every_message_uses_is_refused_before_anything_is_claimed(
    engine: Engine,
    config: TriggersConfig,
    server: LocalSmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    setting: dict[str, str],
    named: str,
) -> None:
    ids = seed(engine, config, [{}, {}])
    if "mailto" in setting:
        monkeypatch.setenv("TRIGGERS_UNSUBSCRIBE_MAILTO", setting["mailto"])
    if "sender" in setting:
        campaigns = [c.model_copy(update={"sender": setting["sender"]}) for c in config.campaigns]
        config = config.model_copy(update={"campaigns": campaigns})
    with pytest.raises(ConfigError, match=named):
        deliver(engine, config, server, unsubscribe_url=setting.get("unsubscribe_url"))
    assert all((r.status, r.attempts) == ("pending", 0) for r in rows(engine).values())
    assert not server.messages and len(ids) == 2


# -- relay-wide refusals ------------------------------------------------------------------------
RELAY_FAULTS = {
    "530 authentication required": None,  # a relay that needs a login, reached without one
    "5xx to MAIL FROM": ("550 5.7.1 Sender address rejected: not owned by user", "MAIL"),
    "relay denied": ("554 5.7.1 <person@example.org>: Relay access denied", "RCPT"),
    "the same 5xx again and again": ("554 5.6.0 Message content rejected", "DATA"),
}


def in_mode(server: LocalSmtpServer, mode: str, **kwargs: Any) -> LocalSmtpServer:
    """``server``, or (CHUNKING, or ``kwargs``) a server in its place that offers it: the sender's
    BDAT path."""
    if mode == "PIPELINING" and not kwargs:
        return server
    server.stop()
    return LocalSmtpServer(port=server.port, chunking=mode == "CHUNKING", **kwargs).start()


MODES = ["PIPELINING", "CHUNKING"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(RELAY_FAULTS))
def test_a_relay_wide_refusal_gives_the_claims_back_and_fails_the_run_with_the_reply(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, fault: str, mode: str
) -> None:
    seed(engine, config, [{} for _ in range(12)])
    refused = RELAY_FAULTS[fault]
    relay = in_mode(server, mode, **({"credentials": ("shop", "password")} if refused is None else {}))
    if refused is not None:
        relay.fail_next(1000, refused[0], at=refused[1])
    same_5xx = fault == "the same 5xx again and again"
    streak = {"max_same_refusals": 3} if same_5xx else {}
    try:
        with pytest.raises(RelayRefusedError, match="refuses every message") as raised:
            deliver(engine, config, relay, connections=1, **streak)
    finally:
        relay.stop()
    assert (refused[0] if refused else "530") in str(raised.value)
    assert statuses(engine) == Counter({"pending": 12})  # the streak's first refusals too
    assert all(r.attempts == 0 for r in rows(engine).values())
    assert not relay.messages


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("emails", [12, 2], ids=["a success breaks the streak", "the last emails"])
def test_refusals_short_of_a_streak_are_recorded_failed_after_all(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, emails: int, mode: str
) -> None:
    """Held refusals are recorded once the streak breaks, or once nothing is left to send."""
    seed(engine, config, [{} for _ in range(emails)])
    relay = in_mode(server, mode)
    relay.fail_next(2, "554 5.6.0 Message content rejected", at="DATA")
    try:
        deliver(engine, config, relay, connections=1, max_same_refusals=3)
    finally:
        relay.stop()
    assert statuses(engine) == +Counter({"failed": 2, "sent": emails - 2})
    assert all(r.reason == "smtp_rejected" for r in rows(engine).values() if r.status == "failed")


def test_a_refused_login_stops_every_connection_and_gives_the_claims_back(
    engine: Engine, config: TriggersConfig
) -> None:
    seed(engine, config, [{} for _ in range(6)])
    with LocalSmtpServer(credentials=("shop", "right-password")) as secured:
        connection = SimpleNamespace(
            host="127.0.0.1",
            port=secured.port,
            login="shop",
            password="wrong-password",
            extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 0},
        )
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t", connections=2)
        with pytest.raises(RelayRefusedError, match="refused the login of 'shop'") as raised:
            deliver_pending(engine, config, settings_of(connection), options)
    assert "wrong-password" not in str(raised.value)
    assert all((r.status, r.attempts) == ("pending", 0) for r in rows(engine).values())


def test_a_connection_with_a_login_and_no_password_is_refused_when_read() -> None:
    connection = SimpleNamespace(
        host="127.0.0.1",
        port=2525,
        login="shop",
        password="",
        extra_dejson={"disable_ssl": True, "disable_tls": True},
    )
    with pytest.raises(SmtpUnavailableError, match="smtp_default has the login 'shop' but no password"):
        settings_of(connection)


# -- leases -------------------------------------------------------------------------------------
def test_a_claim_that_aged_in_a_reconnect_loop_is_not_sent_and_a_row_taken_over_is_left_alone(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}])
    server.stop()  # the sender waits in its reconnect loop with the claim in hand
    options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="slow", lease=2.0)
    thread, outcome = in_background(
        lambda: deliver_pending(engine, config, smtp_settings(server, retry_limit=6, timeout=0.5), options)
    )
    wait_until(lambda: statuses(engine)["sending"] == 1)
    time.sleep(1.2)  # past half the lease: another run may take the claim over from now on
    take_over(engine)
    server.start()
    thread.join(30)
    assert not server.messages
    counts = outcome.get("counts", outcome)
    assert counts["taken_over"] == 1 and counts["reconnects"] > 0 and "sent" not in counts
    assert rows(engine)[ids[0]].claimed_by == TAKEN_OVER


def test_recording_a_send_checks_that_this_run_still_holds_the_claim(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}])
    server.faults.delay = 1.0  # the relay answers the body slowly
    thread, outcome = in_background(lambda: deliver(engine, config, server))
    wait_until(lambda: statuses(engine)["sending"] == 1)
    take_over(engine)
    thread.join(30)
    assert outcome.get("counts", outcome) == {"taken_over": 1}
    row = rows(engine)[ids[0]]
    assert (row.status, row.claimed_by) == ("sending", TAKEN_OVER)  # left to the run that holds it


# -- a crash is not a failed attempt ------------------------------------------------------------
def test_claims_of_a_dead_worker_are_due_at_once_and_do_not_use_up_the_retry_budget(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{}, {}])
    dead = dead_worker_token()
    for _ in range(5):  # five crashes, each with the rows claimed
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE deliveries SET status = 'sending', claimed_by = :by, claimed_at = :at, "
                    "attempts = attempts + 1"
                ),
                {"by": dead, "at": time.time()},
            )
        assert requeue_interrupted(engine) == 2
    server.fail_next(1)  # one 451: a relay attempt, retried
    counts = deliver(engine, config, server, retry_delay=60.0, max_attempts=3, wait_for_retries=0.0)
    # the 451'd row waits out its (relay) backoff; the other went at once
    assert counts == {"sent": 1, "retried": 1}
    state = rows(engine)
    assert sorted((state[i].status, state[i].attempts) for i in ids) == [("pending", 1), ("sent", 1)]


@pytest.mark.slow
def test_sigkill_while_the_relay_answers_slowly_then_a_run_sends_everything_within_the_window(
    db_url: str, engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(150)])
    server.faults.reply_delay = 0.003  # every reply line comes late
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_WORKER,
            db_url,
            str(server.port),
            json.dumps({"connections": 2, "window": 4, "batch_size": 50, "render_processes": 0}),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert server.wait_for(40, timeout=60), "the worker sent nothing"
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait()
    interrupted = statuses(engine)["sending"]
    assert interrupted > 0
    server.faults.reply_delay = 0.0
    counts = deliver(engine, config, server, connections=2)
    assert counts["requeued_interrupted"] == interrupted
    received = received_ids(server)
    assert set(received) == set(ids)  # nothing lost
    duplicates = sum(n - 1 for n in received.values())
    print(f"killed with {interrupted} rows claimed; duplicates: {duplicates}")
    assert duplicates <= 2 * 4  # connections x window
    # the crash was not an attempt: each row was tried once by the relay's count
    assert {(r.status, r.attempts) for r in rows(engine).values()} == {("sent", 1)}


# -- a body that may have reached the relay counts as an attempt -------------------------------
class _FlappingHandler(socketserver.StreamRequestHandler):
    """A relay that takes one message's body, then vanishes without answering it: the connection
    drops and no new one can be made."""

    def handle(self) -> None:
        server: _FlappingServer = self.server  # type: ignore[assignment]
        self.wfile.write(b"220 flapping ESMTP\r\n")
        for line in self.rfile:
            verb = line[:4].upper()
            if verb == b"EHLO":
                chunking = b"250-CHUNKING\r\n" if server.chunking else b""
                self.wfile.write(b"250-flapping\r\n250-PIPELINING\r\n" + chunking + b"250 8BITMIME\r\n")
            elif verb == b"BDAT":
                self.rfile.read(int(line.split()[1]))
                break
            elif verb == b"DATA":
                self.wfile.write(b"354 Go ahead\r\n")
                next(body for body in self.rfile if body == b".\r\n")
                break
            else:
                self.wfile.write(b"250 OK\r\n")
        server.bodies += 1
        server.socket.close()  # gone: a reconnect is refused
        threading.Thread(target=server.shutdown, daemon=True).start()


class _FlappingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    chunking = False
    bodies = 0


@pytest.mark.parametrize("chunking", [False, True], ids=["PIPELINING", "CHUNKING"])
def test_a_body_followed_by_a_drop_and_no_new_connection_is_an_attempt_not_a_release(
    engine: Engine, config: TriggersConfig, chunking: bool
) -> None:
    (delivery_id,) = seed(engine, config, [{}])
    with _FlappingServer(("127.0.0.1", 0), _FlappingHandler) as relay:
        relay.chunking = chunking
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        connection = SimpleNamespace(
            host="127.0.0.1",
            port=relay.server_address[1],
            login=None,
            password=None,
            extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 1},
        )
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t", connections=1, window=1)
        with pytest.raises(SmtpUnavailableError, match="cannot reach the SMTP relay"):
            deliver_pending(engine, config, settings_of(connection), options)
    assert relay.bodies == 1
    row = rows(engine)[delivery_id]
    # the relay may have it: counted (else a flapping relay resends it forever, never max_attempts)
    assert (row.status, row.attempts) == ("pending", 1) and row.reason.startswith("retry: ")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a row lock holds the requeue's UPDATE
def test_a_claim_taken_again_between_the_requeues_read_and_its_update_is_left_alone(
    engine: Engine, config: TriggersConfig
) -> None:
    ids = seed(engine, config, [{}, {}])
    slow = "slow|another-host|4242|0123456789ab"  # cannot be checked: its lease decides
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'sending', claimed_by = :by, claimed_at = :at, attempts = 1"
            ),
            {"by": slow, "at": time.time() - 1000},  # lease expired
        )
    with engine.connect() as other:
        transaction = other.begin()  # the slow worker gives its claim back and takes it again
        other.execute(
            text("UPDATE deliveries SET claimed_at = :at WHERE delivery_id = :id"),
            {"at": time.time(), "id": ids[0]},
        )
        thread, outcome = in_background(lambda: requeue_interrupted(engine, lease=600.0))
        time.sleep(0.5)  # the requeue read the expired claim; its UPDATE waits for the row lock
        transaction.commit()
    thread.join(10)
    assert outcome == {"counts": 1}  # the rows it changed, not the rows it read
    state = rows(engine)
    assert (state[ids[0]].status, state[ids[0]].claimed_by) == ("sending", slow)  # a live claim
    assert state[ids[1]].status == "pending"
