"""SMTP PIPELINING (RFC 2920): each refusal, 421 and dropped connection against a real server
(aiosmtpd) that offers it, and the same cases against one that does not (one command at a time)."""

from __future__ import annotations

import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine

from include.config import DEFAULT_TEMPLATES_DIR, TriggersConfig, load_config
from include.database.engine import make_engine
from include.delivery.options import DeliveryOptions
from include.delivery.run import deliver_pending
from include.sandbox.smtp_server import LocalSmtpServer
from tests.integration.test_delivery import ROOT, deliver, received_ids, rows, seed, settings_of


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


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-at-a-time"])
def server(request: pytest.FixtureRequest) -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(pipelining=request.param) as smtp:
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
    if server.pipelining and stage != "DATA":  # the commands after the refused one were refused in turn
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
