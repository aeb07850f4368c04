"""SMTP PIPELINING (RFC 2920): each refusal, 421 and dropped connection against a real server
(aiosmtpd) that offers it, and the same cases against one that does not (one command at a time)."""

from __future__ import annotations

import socketserver
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine

from include.config import DEFAULT_TEMPLATES_DIR, RateLimits, TriggersConfig, load_config
from include.database.engine import make_engine
from include.delivery.options import DeliveryOptions
from include.delivery.ratelimit import RateLimiter
from include.delivery.render import RenderedEmail
from include.delivery.run import deliver_pending
from include.delivery.sender import TOO_OLD_AGAIN, Sender
from include.delivery.smtp import SmtpSession
from include.delivery.state import Job, RunState
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import (
    ROOT,
    deliver,
    received_ids,
    rows,
    seed,
    settings_of,
    smtp_settings,
)


@pytest.fixture(scope="module")
def config() -> TriggersConfig:
    loaded = load_config(ROOT / "include" / "triggers.yaml", DEFAULT_TEMPLATES_DIR)
    return loaded.model_copy(update={"limits": loaded.limits.model_copy(update={"rate": None})})


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """SQLite only: what is tested here is the SMTP dialogue (test_delivery covers PostgreSQL)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'triggers.db'}")
    yield engine
    engine.dispose()


MODES = {  # what the server offers; CHUNKING (with PIPELINING) takes the sender's BDAT path
    "pipelining": {"pipelining": True},
    "one-command-at-a-time": {"pipelining": False},
    "chunking": {"pipelining": True, "chunking": True},
}


@pytest.fixture(params=list(MODES))
def server(request: pytest.FixtureRequest) -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(**MODES[request.param]) as smtp:  # type: ignore[arg-type]
        yield smtp


def connections_opened(server: LocalSmtpServer) -> int:
    return server.replies.count("250 HELP")  # the last line of each EHLO reply


def assert_in_step(server: LocalSmtpServer) -> None:
    """No message body was ever read as commands, and the client pipelined iff the server offered it."""
    assert not [reply for reply in server.replies if reply.startswith(("500", "502"))]
    assert (server.pipelined_groups > 0) == server.pipelining


def test_with_pipelining_a_message_costs_one_round_trip_and_without_it_four(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    ids = seed(engine, config, [{} for _ in range(5)])
    assert deliver(engine, config, server) == {"sent": 5}
    assert received_ids(server) == Counter({i: 1 for i in ids})
    if server.chunking:  # each message in one write: MAIL, RCPT, BDAT LAST and the body
        assert server.chunked_messages == 5 and server.reads <= 8
        return
    assert server.pipelined_groups == (5 if server.pipelining else 0)
    # EHLO, then MAIL+RCPT+DATA, then each body with the next message's MAIL+RCPT+DATA, then QUIT
    assert server.reads <= 8 if server.pipelining else server.reads >= 4 * 5 + 2
    assert_in_step(server)
    assert connections_opened(server) == 1


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_a_4xx_is_retried_and_the_connection_goes_on(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, stage: str
) -> None:
    ids = seed(engine, config, [{} for _ in range(3)])
    server.fail_next(1, reply="450 4.2.1 Try again later", at=stage)
    counts = deliver(engine, config, server)
    assert counts == {"sent": 3, "retried": 1}
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert sorted(r.attempts for r in rows(engine).values()) == [1, 1, 2]
    if server.pipelining and stage == "MAIL":  # the commands after the refused one were refused in turn
        assert any(reply.startswith("503") for reply in server.replies)
    assert_in_step(server)
    assert connections_opened(server) == 1  # after RSET (a refused envelope), or none (a refused body)


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])  # a 5xx to MAIL FROM refuses all: test_delivery_faults
def test_a_5xx_fails_that_message_with_its_reply_and_the_others_go_on(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, stage: str
) -> None:
    ids = seed(engine, config, [{}, {"email": "gone@example.org"}, {}])
    if stage == "RCPT":
        server.reject("gone@example.org")
    else:
        server.fail_next(1, reply="554 5.7.1 Refused", at=stage)
    counts = deliver(engine, config, server)
    assert counts == {"sent": 2, "failed": 1, **({"hard_bounced": 1} if stage == "RCPT" else {})}  # 5.1.1
    state = rows(engine)
    failed = [r for r in state.values() if r.status == "failed"]
    assert [(r.reason, r.attempts) for r in failed] == [("smtp_rejected", 1)]
    assert failed[0].smtp_reply.startswith("550 5.1.1" if stage == "RCPT" else "554 5.7.1")
    assert sum(received_ids(server).values()) == 2 and set(received_ids(server)) < set(ids)
    assert_in_step(server)
    assert connections_opened(server) == 1


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_a_421_closes_the_connection_and_the_message_is_retried_on_a_new_one(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, stage: str
) -> None:
    ids = seed(engine, config, [{} for _ in range(4)])
    server.fail_next(1, reply="421 4.7.0 Too many messages, closing", at=stage)
    counts = deliver(engine, config, server)
    if server.chunking:  # the messages written behind the 421'd one go again on the new connection
        assert counts.pop("connection_drops") == 1
        # its 421 is read; or, the connection closed under the body written behind it, the reset
        # discards the 421 unread (TCP): a drop, and the message goes again on the new one
        counts.setdefault("retried", 1)
    assert counts == {"sent": 4, "retried": 1}
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert {r.status for r in rows(engine).values()} == {"sent"}
    assert_in_step(server)
    assert connections_opened(server) == 2


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_a_connection_dropped_at_any_command_loses_nothing_and_sends_nothing_twice(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, stage: str
) -> None:
    ids = seed(engine, config, [{} for _ in range(6)])
    server.drop_next(2, at=stage)
    counts = deliver(engine, config, server, connections=2)
    assert counts["sent"] == 6 and counts["connection_drops"] == 2
    assert received_ids(server) == Counter({i: 1 for i in ids})
    assert_in_step(server)


def test_lines_that_start_with_a_dot_arrive_intact(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer, tmp_path: Path
) -> None:
    for path in DEFAULT_TEMPLATES_DIR.glob("cart_abandonment.*"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    body = ".a line that starts with a dot\n..two dots\n.\nthe last line"
    (tmp_path / "cart_abandonment.txt.j2").write_text(body)
    (tmp_path / "cart_abandonment.html.j2").write_text(body.replace("\n", "\n<br>\n"))
    seed(engine, config, [{}])
    assert deliver(engine, config, server, templates_dir=tmp_path) == {"sent": 1}
    message = server.messages[0].message
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n") == body
    assert ".\n<br>\n" in message.get_body(("html",)).get_content().replace("\r\n", "\n")
    assert_in_step(server)


class _LenientHandler(socketserver.StreamRequestHandler):
    """A relay that answers 354 to DATA though it refused the only recipient (RFC 2920 allows it)."""

    def handle(self) -> None:
        server: _LenientServer = self.server  # type: ignore[assignment]
        self.wfile.write(b"220 lenient ESMTP\r\n")
        in_data = False
        for line in self.rfile:
            if in_data:
                server.data_lines.append(line)
                if line == b".\r\n":
                    in_data = False
                    self.wfile.write(b"554 5.5.1 No valid recipients\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-lenient\r\n250 PIPELINING\r\n")
            elif verb == b"RCPT":
                self.wfile.write(b"550 5.1.1 No such user\r\n")
            elif verb == b"DATA":
                in_data = True
                self.wfile.write(b"354 Go ahead\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 Bye\r\n")
                return
            else:
                self.wfile.write(b"250 OK\r\n")


class _LenientServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    data_lines: list[bytes]


def test_a_data_accepted_after_the_recipient_was_refused_gets_an_empty_end_not_the_message(
    engine: Engine, config: TriggersConfig
) -> None:
    seed(engine, config, [{}])
    with _LenientServer(("127.0.0.1", 0), _LenientHandler) as lenient:
        lenient.data_lines = []
        threading.Thread(target=lenient.serve_forever, daemon=True).start()
        smtp = settings_of(
            SimpleNamespace(
                host="127.0.0.1",
                port=lenient.server_address[1],
                login=None,
                password=None,
                extra_dejson={"disable_ssl": True, "disable_tls": True, "retry_limit": 0},
            )
        )
        counts = deliver_pending(
            engine, config, smtp, DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t")
        )
        lenient.shutdown()
    assert counts == {"failed": 1, "hard_bounced": 1}
    (row,) = rows(engine).values()
    assert (row.status, row.smtp_reply) == ("failed", "550 5.1.1 No such user")
    assert lenient.data_lines == [b".\r\n"]


def test_once_the_run_stops_a_job_holding_a_window_slot_is_given_back_not_sent(
    server: LocalSmtpServer,
) -> None:
    """The database went down: the recorder frees window slots without writing, so they bound
    nothing any more; a job that got its slot then must not go (both paths)."""
    options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t", connections=1, window=1)
    state = RunState(options, "t")
    session = SmtpSession(smtp_settings(server), None, state.count)
    session.connect()
    body = b"Subject: x\r\n\r\nbody\r\n"
    job = Job(
        "d1",
        RenderedEmail("shop@example.com", "p@example.org", body, "<1@x>"),
        1,
        state.clock(),
        "example.org",
    )
    state.fatal.append(RuntimeError("cannot record: the database is down"))
    sender = Sender(state, session, RateLimiter(None), 0)
    run = sender._run_chunked if session.chunking else sender._run_pipelined
    assert run(job, threading.Semaphore(1)) is False
    result = state.results.get_nowait()
    assert (result.job, result.outcome) == (job, "release") and not server.messages
    session.close()


def test_a_message_sent_again_after_a_drop_takes_a_rate_slot_of_its_own(
    engine: Engine, config: TriggersConfig, server: LocalSmtpServer
) -> None:
    limited = config.model_copy(
        update={"limits": config.limits.model_copy(update={"rate": RateLimits(per_second=5)})}
    )
    ids = seed(engine, limited, [{}, {}])
    server.drop_next(1, at="DATA")  # after the first body: it goes again on a new connection
    started = time.time()
    counts = deliver(engine, limited, server)
    assert counts["sent"] == 2 and counts["connection_drops"] == 1
    assert received_ids(server) == Counter({i: 1 for i in ids})
    # three sends at 5/s (one again): the last one 0.4 s or more after the first slot
    assert max(m.received_at for m in server.messages) - started >= 2 / 5 * 0.95


def test_after_a_drop_the_bdat_path_does_not_write_again_a_message_whose_claim_grew_too_old() -> None:
    """As the PIPELINING path's ``expires``: another worker may take an old claim over."""
    with LocalSmtpServer(pipelining=True, chunking=True) as server:
        options = DeliveryOptions(templates_dir=DEFAULT_TEMPLATES_DIR, worker_id="t", connections=1, window=2)
        state = RunState(options, "t")
        session = SmtpSession(smtp_settings(server), None, state.count)
        session.connect()
        sender = Sender(state, session, RateLimiter(None), 0)
        now, body = state.clock(), b"Subject: x\r\n\r\nbody\r\n"
        old, fresh = (
            Job(
                d,
                RenderedEmail("shop@example.com", f"{d}@example.org", body, f"<{d}@x>"),
                1,
                at,
                "example.org",
            )
            for d, at in (("old", now - options.lease / 2 - 1), ("fresh", now))
        )
        window = threading.Semaphore(2)
        window.acquire()
        window.acquire()
        inflight = deque([old, fresh])  # both written on a connection that dropped, unanswered
        assert sender._rewrite(inflight, window, OSError("dropped")) is None
        assert list(inflight) == [fresh] and session.read_chunked().outcome == "sent"
        result = state.results.get_nowait()
        assert (result.job, result.outcome, result.reply) == (old, "retry", TOO_OLD_AGAIN)  # an attempt
        assert [m.rcpt_tos for m in server.messages] == [("fresh@example.org",)]
        session.close()
