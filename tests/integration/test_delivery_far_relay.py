"""Delivery to a relay that is far away: the local SMTP server (aiosmtpd) behind a delay line
(10 ms each way: a 20 ms round trip), offering PIPELINING or not, CHUNKING or not, capping its
connections or not; a worker SIGKILLed mid-run, then a second run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from include.config import DEFAULT_TEMPLATES_DIR, RateLimits, TriggersConfig, load_config
from include.database.engine import make_engine
from include.delivery.options import DeliveryOptions
from include.delivery.run import deliver_pending
from include.delivery.smtp import RelayBusy, SmtpSession, SmtpSettings
from include.errors import SmtpUnavailableError
from include.sandbox.delayline import DelayLine
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import KILLED_WORKER, ROOT, received_ids, rows, seed, settings_of

DELAY = 0.010  # seconds each way
SESSIONS = 6  # the cap of the sized pool in these tests


@pytest.fixture(scope="module")
def config() -> TriggersConfig:
    loaded = load_config(ROOT / "include" / "triggers.yaml", DEFAULT_TEMPLATES_DIR)
    return loaded.model_copy(update={"limits": loaded.limits.model_copy(update={"rate": None})})


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'triggers.db'}")
    yield engine
    engine.dispose()


MODES = {
    "one-command-at-a-time": {"pipelining": False},
    "pipelining": {"pipelining": True},
    "pipelining+chunking": {"pipelining": True, "chunking": True},
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def far(server: LocalSmtpServer) -> DelayLine:
    return DelayLine(server.port, DELAY).start()


def settings_for(line: DelayLine, **extra: object) -> SmtpSettings:
    connection = SimpleNamespace(
        host="127.0.0.1",
        port=line.port,
        login=None,
        password=None,
        extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 6, **extra},
    )
    return settings_of(connection)


def deliver_far(engine: Engine, config: TriggersConfig, line: DelayLine, **options: object) -> dict[str, int]:
    chosen = {"templates_dir": DEFAULT_TEMPLATES_DIR, "worker_id": "far", "retry_delay": 0.05}
    chosen.update({"connections": 0, "max_connections": SESSIONS, **options})
    return deliver_pending(engine, config, settings_for(line), DeliveryOptions(**chosen))  # type: ignore[arg-type]


def test_every_email_is_delivered_once_and_recorded_sent_through_a_far_relay(
    sqlite_engine: Engine, config: TriggersConfig, mode: str
) -> None:
    ids = seed(sqlite_engine, config, [{} for _ in range(80)])
    with LocalSmtpServer(**MODES[mode]) as server, far(server) as line:  # type: ignore[arg-type]
        counts = deliver_far(sqlite_engine, config, line)
    assert counts == {"sent": 80}
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert all((r.status, r.attempts) == ("sent", 1) for r in rows(sqlite_engine).values())
    assert server.most_connections == SESSIONS  # far, no rate: the pool is the cap
    assert server.chunked_messages == (80 if mode == "pipelining+chunking" else 0)
    assert (server.pipelined_groups > 0) == MODES[mode]["pipelining"]
    assert not [reply for reply in server.replies if reply.startswith(("500", "502", "503", "554"))]


def test_a_rate_limit_sizes_the_pool_and_holds_across_its_sessions(
    sqlite_engine: Engine, config: TriggersConfig
) -> None:
    limited = config.model_copy(
        update={"limits": config.limits.model_copy(update={"rate": RateLimits(per_second=60)})}
    )
    ids = seed(sqlite_engine, limited, [{} for _ in range(30)])
    with LocalSmtpServer() as server, far(server) as line:
        counts = deliver_far(sqlite_engine, limited, line, max_connections=20)
    assert counts == {"sent": 30}
    assert received_ids(server) == Counter({i: 1 for i in ids})
    # 60/s, a session sending one message per two round trips of at least 20 ms (no chaining under
    # a rate): 3 sessions or more with the headroom (more if the machine's load lengthens the
    # measured round trip), never the cap of 20
    assert 3 <= server.most_connections < 20
    times = sorted(m.received_at for m in server.messages)
    assert times[-1] - times[0] >= 29 / 60 * 0.9  # spaced, whichever session sent them


def test_a_relay_capping_connections_shrinks_the_pool_and_fails_nothing(
    sqlite_engine: Engine, config: TriggersConfig, mode: str
) -> None:
    ids = seed(sqlite_engine, config, [{} for _ in range(60)])
    with LocalSmtpServer(**MODES[mode], max_connections=2) as server, far(server) as line:  # type: ignore[arg-type]
        counts = deliver_far(sqlite_engine, config, line)
    assert counts["sent"] == 60 and "failed" not in counts and "retried" not in counts
    assert counts["sessions_refused"] == SESSIONS - 2 == server.refused_connections
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert all((r.status, r.attempts) == ("sent", 1) for r in rows(sqlite_engine).values())


def test_the_relays_cap_is_the_smtp_connections_extra_max_connections(
    sqlite_engine: Engine, config: TriggersConfig
) -> None:
    ids = seed(sqlite_engine, config, [{} for _ in range(40)])
    with LocalSmtpServer() as server, far(server) as line:
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="far", connections=0)
        counts = deliver_pending(sqlite_engine, config, settings_for(line, max_connections=3), options)
    assert counts == {"sent": 40} and received_ids(server) == Counter({i: 1 for i in ids})
    assert server.most_connections == 3
    for wrong in ("many", 0, True):
        with pytest.raises(SmtpUnavailableError, match="extra max_connections must be a whole number"):
            settings_for(line, max_connections=wrong)


def test_when_even_the_last_session_is_refused_it_waits_and_tries_again(
    sqlite_engine: Engine, config: TriggersConfig
) -> None:
    ids = seed(sqlite_engine, config, [{} for _ in range(10)])
    with LocalSmtpServer(max_connections=1) as server, far(server) as line:
        other = socket.create_connection(("127.0.0.1", server.port))  # another client holds the only slot
        threading.Timer(0.8, other.close).start()
        counts = deliver_far(sqlite_engine, config, line)
    assert counts["sent"] == 10 and counts["relay_busy_waits"] >= 1 and "failed" not in counts
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert all(r.attempts == 1 for r in rows(sqlite_engine).values())


@pytest.mark.slow
@pytest.mark.parametrize("chunking", [False, True], ids=["pipelining", "chunking"])
def test_a_far_worker_killed_mid_run_sends_at_most_sessions_times_window_twice(
    db_url: str, engine: Engine, config: TriggersConfig, chunking: bool
) -> None:
    ids = seed(engine, config, [{} for _ in range(400)])
    with LocalSmtpServer(chunking=chunking) as server, far(server) as line:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILLED_WORKER,
                db_url,
                str(line.port),
                json.dumps({"connections": 0, "max_connections": SESSIONS, "batch_size": 50}),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert server.wait_for(60, timeout=60), "the worker sent nothing"
            os.kill(worker.pid, signal.SIGKILL)
        finally:
            worker.wait()
        before = Counter(r.status for r in rows(engine).values())
        assert before["sending"] > 0 and before["pending"] > 0  # killed mid-run, with claimed rows
        counts = deliver_far(engine, config, line)
    assert counts["requeued_interrupted"] == before["sending"]
    received = received_ids(server)
    assert set(received) == set(ids)  # nothing lost
    twice = sum(n - 1 for n in received.values())
    bound = SESSIONS * 2  # sessions x window: far, the window is 2
    print(f"killed with {before['sending']} rows in 'sending'; sent twice: {twice} (bound {bound})")
    assert twice <= bound
    assert {r.status for r in rows(engine).values()} == {"sent"}


# -- BDAT on the wire ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunking_server() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(chunking=True) as server:
        yield server


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=4))
def test_bdat_bodies_of_any_bytes_arrive_byte_identical(
    chunking_server: LocalSmtpServer, bodies: list[bytes]
) -> None:
    """Dots at line starts, lone CR and LF, NUL, a body ending without CRLF or with '.\\r\\n':
    BDAT sends the bytes as they are and they arrive so, several messages in flight."""
    session = SmtpSession(
        SmtpSettings(host="127.0.0.1", port=chunking_server.port, use_ssl=False, starttls=False), None, print
    )
    session.connect()
    assert session.chunking
    start = len(chunking_server.messages)
    try:
        for body in bodies:
            session.write_chunked(
                SimpleNamespace(envelope_from="a@example.org", envelope_to="b@example.org", data=body)
            )  # type: ignore[arg-type]
        outcomes = [session.read_chunked().outcome for _ in bodies]
    finally:
        session.close()
    assert outcomes == ["sent"] * len(bodies)
    assert [m.data for m in chunking_server.messages[start:]] == bodies


def test_a_421_greeting_is_relay_busy_not_a_failure() -> None:
    with LocalSmtpServer(max_connections=0) as server:
        session = SmtpSession(
            SmtpSettings(host="127.0.0.1", port=server.port, use_ssl=False, starttls=False), None, print
        )
        with pytest.raises(RelayBusy, match="421 4.7.0 too many connections"):
            session.connect()
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP("127.0.0.1", server.port)


def test_a_run_with_its_pool_and_window_given_still_measures_the_relays_distance(
    sqlite_engine: Engine, config: TriggersConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Far changes how results are committed (at once, no lingering for a group): it is measured
    on the first connection, which is opened anyway."""
    seed(sqlite_engine, config, [{} for _ in range(3)])
    with (
        LocalSmtpServer() as server,
        far(server) as line,
        caplog.at_level(logging.INFO, "include.delivery.run"),
    ):
        assert deliver_far(sqlite_engine, config, line, connections=2, window=4) == {"sent": 3}
    (sized,) = [r.getMessage() for r in caplog.records if "SMTP session(s)" in r.getMessage()]
    found = re.search(r"2 SMTP session\(s\), window 4 \(relay round trip ([\d.]+) ms\)", sized)
    assert found and float(found.group(1)) >= 2 * DELAY * 1000 * 0.9, sized
