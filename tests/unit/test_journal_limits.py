"""The journal client's response limits against a real local HTTP server: a body over the size cap
is a clear error (read in pieces, never held whole), and a server that dribbles bytes is cut off by
the total read deadline, not only by the socket timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from include.adobe.auth import ImsAuthenticator
from include.adobe.journal import JournalClient, JournalPage
from include.errors import PipelineRequestError, PipelineUnavailableError
from tests.conftest import serving
from tests.unit.test_journal import CONSUMER, credentials

CAP = 1024 * 1024


class HostileJournal(ThreadingHTTPServer):
    """Issues tokens; the journal answers as ``mode`` says: 'dribble' (one byte every 0.2 s),
    'declared' (a Content-Length over the cap), 'flood' (chunked, without end), 'page'."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.mode = "page"
        self.sent = 0


class _Handler(BaseHTTPRequestHandler):
    server: HostileJournal
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"access_token":"t","token_type":"bearer","expires_in":86400}'
        self._head(200, {"Content-Length": str(len(body))})
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        mode = self.server.mode
        try:
            if mode == "page":
                body = b'{"events":[]}'
                self._head(200, {"Content-Length": str(len(body))})
                self.wfile.write(body)
            elif mode == "dribble":
                self._head(200, {"Content-Length": "1000"})
                for _ in range(1000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif mode == "declared":
                self._head(200, {"Content-Length": str(100 * CAP)})
                self.wfile.write(b" " * 1000)
            else:  # flood: chunked, far more than the cap, until the client hangs up
                self._head(200, {"Transfer-Encoding": "chunked"})
                piece = b" " * 65536
                for _ in range(1024 * CAP // len(piece)):  # 1 GiB
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.server.sent += len(piece)
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up, as it should
            pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[HostileJournal]:
    with serving(HostileJournal()) as server:
        yield server


@pytest.fixture(autouse=True)
def no_token_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", "off")


def client(server: HostileJournal, **limits: float) -> JournalClient:
    return JournalClient(
        ImsAuthenticator(credentials(server.url)),
        CONSUMER,
        retry_validity=limits.pop("retry_validity", 300.0),
        timeout=(5.0, 5.0),  # the socket timeout alone would never fire: a byte comes every 0.2 s
        sleep=lambda seconds: None,
        max_response_bytes=CAP,
        **limits,
    )


def test_a_page_within_the_limits_is_read(server: HostileJournal) -> None:
    assert client(server).fetch(None, 10) == JournalPage(b'{"events":[]}')


def test_a_dribbling_server_is_cut_off_by_the_total_read_deadline(server: HostileJournal) -> None:
    server.mode = "dribble"
    journal = client(server, read_deadline=1.0, retry_validity=1.5)
    started = time.monotonic()
    with pytest.raises(PipelineUnavailableError, match="read deadline"):
        journal.fetch(None, 10)
    assert time.monotonic() - started < 6  # 200 s of dribble without the deadline


@pytest.mark.parametrize("mode", ["declared", "flood"])
def test_a_body_over_the_cap_is_a_clear_error(server: HostileJournal, mode: str) -> None:
    server.mode = mode
    with pytest.raises(PipelineRequestError, match="over the client's cap of 1,048,576 bytes.*fetch_size"):
        client(server).fetch(None, 10)
    time.sleep(0.2)
    assert server.sent < 64 * CAP  # the client hung up soon after the cap (kernel buffers aside)
