"""The journal client (SPEC section 2) against a real local HTTP server that answers from a script,
with a fake clock and sleep: every status of the table, the backoff and its limit, the hook."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from include.adobe.auth import ImsAuthenticator, PipelineCredentials
from include.adobe.journal import JournalClient, JournalDrained, JournalPage
from include.errors import (
    AuthenticationError,
    ConfigError,
    JournalGoneError,
    NotEntitledError,
    PipelineRequestError,
    PipelineUnavailableError,
)
from include.sandbox.net import free_port
from tests.conftest import serving

CONSUMER = "customer_dev"


class Answer:
    def __init__(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, delay: float = 0.0
    ) -> None:
        self.status, self.body, self.headers, self.delay = status, body, headers or {}, delay


class ScriptedPipeline(ThreadingHTTPServer):
    """IMS (OAuth) and the journal on one local port. The journal answers with ``script`` in
    order (then 204); each request's query and headers are kept."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.script: list[Answer] = []
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.tokens_issued = 0


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedPipeline

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.tokens_issued += 1
        body = {
            "access_token": f"token-{self.server.tokens_issued}",
            "token_type": "bearer",
            "expires_in": 86_400,
        }
        self._send(Answer(200, json.dumps(body).encode()))

    def do_GET(self) -> None:  # noqa: N802
        split = urlsplit(self.path)
        self.server.requests.append((split.path, parse_qs(split.query), dict(self.headers)))
        answer = (
            self.server.script.pop(0) if self.server.script else Answer(204, headers={"Retry-After": "5"})
        )
        time.sleep(answer.delay)
        self._send(answer)

    def _send(self, answer: Answer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if answer.status != 204:
                self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:  # the client gave up waiting (the timeout test)
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def pipeline() -> Iterator[ScriptedPipeline]:
    with serving(ScriptedPipeline()) as server:
        yield server


@pytest.fixture(autouse=True)
def no_token_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", "off")


class FakeTime:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def credentials(url: str) -> PipelineCredentials:
    return PipelineCredentials(
        pipeline_url=url,
        ims_url=url,
        client_id="cid",
        client_secret="secret",
        org_id="12345@AdobeOrg",
        auth="oauth",
    )


def client_of(
    pipeline: ScriptedPipeline,
    fake_time: FakeTime,
    *,
    retry_validity: float = 300.0,
    consumer: str | None = CONSUMER,
    url: str | None = None,
) -> JournalClient:
    return JournalClient(
        ImsAuthenticator(credentials(url or pipeline.url)),
        consumer,
        retry_validity=retry_validity,
        sleep=fake_time.sleep,
        clock=fake_time.clock,
    )


def page_body(*positions: str) -> bytes:
    events = [{"position": p, "event": {"event_id": p}} for p in positions]
    return json.dumps({"events": events, "_page": {"last": positions[-1], "count": len(positions)}}).encode()


def next_link(pipeline: ScriptedPipeline, since: str) -> dict[str, str]:
    return {"Link": f'<{pipeline.url}/journal/{CONSUMER}?since={since}&limit=50>; rel="next"'}


def test_200_is_a_page_as_sent_with_the_next_position_of_the_link_header(pipeline, fake_time):
    body = page_body("p-1", "p-2")
    pipeline.script = [Answer(200, body, next_link(pipeline, "p-2")), Answer(200, body), Answer(200, body)]
    client = client_of(pipeline, fake_time)
    assert client.fetch(None, 50) == JournalPage(body, "p-2")
    assert client.fetch("p-2", 10).next_position is None  # no Link header
    client.fetch(None, 10, latest=True)

    (path, first, headers), (_, second, _), (_, third, _) = pipeline.requests
    assert path == f"/journal/{CONSUMER}"
    assert first == {"limit": ["50"]}  # no since: the oldest retained event
    assert second == {"since": ["p-2"], "limit": ["10"]} and third == {"latest": ["true"], "limit": ["10"]}
    assert headers["Authorization"] == "Bearer token-1"
    assert (headers["x-api-key"], headers["x-ims-org-id"]) == ("cid", "12345@AdobeOrg")
    assert pipeline.tokens_issued == 1 and fake_time.sleeps == []


def test_204_is_the_journal_drained_with_retry_after_and_the_end_position(pipeline, fake_time):
    pipeline.script = [Answer(204, headers={"Retry-After": "7", **next_link(pipeline, "end-9")})]
    assert client_of(pipeline, fake_time).fetch(None, 50, latest=True) == JournalDrained(7.0, "end-9")
    assert fake_time.sleeps == []


def test_401_reauthenticates_once_and_retries_the_request(pipeline, fake_time):
    pipeline.script = [Answer(401), Answer(200, page_body("p-1"))]
    client = client_of(pipeline, fake_time)
    assert isinstance(client.fetch(None, 50), JournalPage)
    assert [headers["Authorization"] for _, _, headers in pipeline.requests] == [
        "Bearer token-1",
        "Bearer token-2",
    ]
    assert fake_time.sleeps == [] and client.retries == 0


def test_a_second_401_after_reauthenticating_fails(pipeline, fake_time):
    pipeline.script = [Answer(401), Answer(401), Answer(200, page_body("p-1"))]
    with pytest.raises(AuthenticationError, match="refused a freshly issued token"):
        client_of(pipeline, fake_time).fetch(None, 50)
    assert len(pipeline.requests) == 2 and pipeline.tokens_issued == 2


def test_403_fails_fast_naming_the_consumer(pipeline, fake_time):
    pipeline.script = [Answer(403, b"not entitled"), Answer(200, page_body("p-1"))]
    client = client_of(pipeline, fake_time)
    with pytest.raises(NotEntitledError, match=f"consumer '{CONSUMER}'.*pipeline.consumer"):
        client.fetch(None, 50)
    assert len(pipeline.requests) == 1 and client.retries == 0 and fake_time.sleeps == []


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (410, JournalGoneError, "position 'p-old' is older than the journal's retention"),
        (400, PipelineRequestError, "400 bad since"),
    ],
)
def test_410_and_400_fail_without_retrying(pipeline, fake_time, status, error, words):
    pipeline.script = [Answer(status, b"bad since"), Answer(200, page_body("p-1"))]
    with pytest.raises(error, match=words):
        client_of(pipeline, fake_time).fetch("p-old", 50)
    assert len(pipeline.requests) == 1 and fake_time.sleeps == []


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_honouring_retry_after(pipeline, fake_time, status):
    pipeline.script = [Answer(status, headers={"Retry-After": "7"})] * 2 + [Answer(200, page_body("p-1"))]
    client = client_of(pipeline, fake_time)
    assert isinstance(client.fetch(None, 50), JournalPage)
    assert fake_time.sleeps == [7.0, 7.0]  # the backoff's jitter (< 1 s for two attempts) is shorter
    assert client.retries == 2 and len(pipeline.requests) == 3


def test_without_retry_after_the_backoff_doubles_up_to_its_cap(pipeline, fake_time, monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the jitter's longest draw
    pipeline.script = [Answer(503)] * 8 + [Answer(200, page_body("p-1"))]
    assert isinstance(client_of(pipeline, fake_time, retry_validity=1000).fetch(None, 50), JournalPage)
    assert fake_time.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_transient_failures_fail_once_retry_validity_would_be_passed(pipeline, fake_time):
    pipeline.script = [Answer(503, headers={"Retry-After": "40"})] * 10
    with pytest.raises(
        PipelineUnavailableError, match=r"kept failing \(503\) for 100 s \(pipeline.retry_validity\)"
    ):
        client_of(pipeline, fake_time, retry_validity=100).fetch(None, 50)
    assert fake_time.sleeps == [40.0, 40.0] and len(pipeline.requests) == 3  # a third wait would end at 120 s


def test_a_retry_after_beyond_retry_validity_fails_at_once(pipeline, fake_time):
    pipeline.script = [Answer(429, headers={"Retry-After": "500"}), Answer(200, page_body("p-1"))]
    with pytest.raises(PipelineUnavailableError, match="429"):
        client_of(pipeline, fake_time).fetch(None, 50)
    assert fake_time.sleeps == [] and len(pipeline.requests) == 1


def test_connection_errors_are_transient(pipeline, fake_time, monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    port = free_port()  # nothing listens on it
    client = client_of(pipeline, fake_time, retry_validity=10)
    client.url = f"http://127.0.0.1:{port}/journal/{CONSUMER}"
    with pytest.raises(PipelineUnavailableError, match="ConnectionError"):
        client.fetch(None, 50)
    assert fake_time.sleeps == [0.5, 1.0, 2.0, 4.0] and client.retries == 4


def test_a_timeout_is_transient(pipeline, fake_time):
    pipeline.script = [Answer(200, page_body("p-1"), delay=1.0), Answer(200, page_body("p-2"))]
    client = client_of(pipeline, fake_time)
    client.timeout = (2.0, 0.2)
    page = client.fetch(None, 50)
    assert json.loads(page.body)["_page"]["last"] == "p-2"  # the slow answer was given up for a retry
    assert client.retries == 1 and len(fake_time.sleeps) == 1


def test_a_client_without_a_consumer_authenticates_but_does_not_fetch(pipeline, fake_time):
    client = client_of(pipeline, fake_time, consumer=None)
    assert client.authenticator.token_info()["client_id"] == "cid"
    with pytest.raises(ConfigError, match="AdobePipelineHook"):
        client.fetch(None, 50)
    assert pipeline.requests == []


def test_the_hook_makes_one_client_from_the_connection_and_closes_its_session(pipeline, monkeypatch):
    from include.adobe.hook import AdobePipelineHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_ADOBE_PIPELINE",
        json.dumps(
            {
                "conn_type": "http",
                "host": pipeline.url,
                "login": "cid",
                "password": "secret",
                "extra": {"auth": "oauth", "ims_url": pipeline.url, "org_id": "12345@AdobeOrg"},
            }
        ),
    )
    pipeline.script = [Answer(200, page_body("p-1"))]
    closed: list[bool] = []
    with AdobePipelineHook(consumer=CONSUMER, retry_validity=42.0) as hook:
        client = hook.get_conn()
        monkeypatch.setattr(client.session, "close", lambda: closed.append(True))
        assert hook.get_conn() is client and (client.consumer, client.retry_validity) == (CONSUMER, 42.0)
        assert client.authenticator.credentials.pipeline_url == pipeline.url
        assert isinstance(client.fetch(None, 50), JournalPage)
        assert hook.test_connection() == (True, "IMS issued a oauth token for client cid")
        assert closed == []
    assert closed and pipeline.tokens_issued == 1  # test_connection reused the cached token
    assert AdobePipelineHook().get_conn().consumer is None
