"""The pipeline journal client (SPEC section 2): one request, every status of the table handled.

A response is read in pieces against a size cap (a larger body is an error that names the cap,
not a process out of memory) and a total deadline per request (a server that dribbles bytes
cannot hold a drain longer than the deadline, whatever the socket timeout).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import requests
import urllib3

from include.adobe.auth import ImsAuthenticator
from include.errors import (
    AuthenticationError,
    ConfigError,
    JournalGoneError,
    NotEntitledError,
    PipelineRequestError,
    PipelineUnavailableError,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_VALIDITY = 300.0  # seconds (SPEC section 2)
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE = 0.5  # seconds; doubles per attempt, full jitter
BACKOFF_CAP = 30.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a page of 1,000 events is ~2 MB
READ_DEADLINE = 300.0  # seconds for a whole response, from the request to its last byte
READ_PIECE = 1024 * 1024


@dataclass(frozen=True)
class JournalPage:
    """A 200 answer, body kept as bytes: staging parses it straight into columns.
    ``next_position`` is the ``since`` of the server's ``Link: rel="next"``, taken as given."""

    body: bytes
    next_position: str | None = None


@dataclass(frozen=True)
class JournalDrained:
    """A 204 answer: nothing after the position for now. After ``latest=true``, the Link
    header's ``since`` (``next_position``) is the position of the journal's end."""

    retry_after: float
    next_position: str | None = None


class JournalClient:
    """``GET {pipeline}/journal/{consumer}`` with authentication, retries and backoff.

    The client owns its authenticator and the HTTP session they share (``close()``). A client
    made without a consumer (``AdobePipelineHook()`` alone) authenticates but cannot fetch.
    """

    def __init__(
        self,
        authenticator: ImsAuthenticator,
        consumer: str | None,
        *,
        retry_validity: float = DEFAULT_RETRY_VALIDITY,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        read_deadline: float = READ_DEADLINE,
    ) -> None:
        self.authenticator = authenticator
        self.credentials = authenticator.credentials
        self.consumer = consumer
        self.url = f"{self.credentials.pipeline_url}/journal/{consumer}" if consumer else None
        self.retry_validity = retry_validity
        self.session = session or authenticator.session
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock  # seconds, monotonic: the retry_validity deadline
        self.max_response_bytes = max_response_bytes
        self.read_deadline = read_deadline  # seconds of the wall clock, whatever ``clock`` is
        self.retries = 0  # transient failures retried, over this client's life

    def close(self) -> None:
        """Close the HTTP session(s) of the client and its authenticator."""
        self.session.close()
        if self.authenticator.session is not self.session:
            self.authenticator.session.close()

    def fetch(self, since: str | None, limit: int, *, latest: bool = False) -> JournalPage | JournalDrained:
        """One page after ``since`` (None: the oldest retained event; ``latest``: the end)."""
        if self.url is None:
            raise ConfigError(
                "this journal client has no consumer: build it with AdobePipelineHook.for_config(config)"
            )
        params: dict[str, str | int] = {"limit": limit}
        if since is not None:
            params["since"] = since
        elif latest:
            params["latest"] = "true"
        deadline = self.clock() + self.retry_validity
        attempt = 0
        reauthenticated = False
        while True:
            problem, retry_after = self._request(params)
            if isinstance(problem, (JournalPage, JournalDrained)):
                return problem
            if problem == 401:
                if reauthenticated:
                    raise AuthenticationError(
                        f"the pipeline at {self.url} refused a freshly issued token (401): the "
                        "integration may lack the pipeline product profile"
                    )
                log.info("pipeline answered 401: re-authenticating once")
                self.authenticator.invalidate()
                reauthenticated = True
                continue
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            delay = max(delay, retry_after or 0.0)
            if self.clock() + delay > deadline:
                raise PipelineUnavailableError(
                    f"the pipeline at {self.url} kept failing ({problem}) for {self.retry_validity:.0f} s "
                    "(pipeline.retry_validity); the task will be retried"
                )
            attempt += 1
            self.retries += 1
            log.warning("pipeline %s; retry %d in %.2f s", problem, attempt, delay)
            self.sleep(delay)

    def _request(
        self, params: dict[str, str | int]
    ) -> tuple[JournalPage | JournalDrained | int | str, float | None]:
        """The answer, or what went wrong (a status or an error name) and any Retry-After."""
        headers = {
            "Authorization": f"Bearer {self.authenticator.token()}",
            "x-api-key": self.credentials.client_id,
            "x-ims-org-id": self.credentials.org_id,
        }
        deadline = time.monotonic() + self.read_deadline
        try:
            response = self.session.get(
                self.url, params=params, headers=headers, timeout=self.timeout, stream=True
            )
        except (requests.ConnectionError, requests.Timeout) as error:
            return type(error).__name__, None
        try:  # closed unless read to its end (then its connection went back to the pool)
            status = response.status_code
            retry_after = _retry_after(response)
            if status == 200:
                try:
                    body = self._read_body(response, deadline)
                except requests.ConnectionError as error:
                    return f"{type(error).__name__} ({error})", None
                if body is None:
                    return f"no whole page within {self.read_deadline:g} s (read deadline)", None
                return JournalPage(body, _next_position(response)), None
            if status == 204:
                return JournalDrained(retry_after or 0.0, _next_position(response)), None
            if status == 401 or status in TRANSIENT_STATUSES:
                return status, retry_after
            detail = (self._read_body(response, deadline, limit=300) or b"").decode("utf-8", "replace")
            raise self._refusal(status, detail.strip(), params)
        finally:
            response.close()

    def _read_body(
        self, response: requests.Response, deadline: float, limit: int | None = None
    ) -> bytes | None:
        """The body, in pieces: None once the deadline has passed; ``limit`` bytes at most, else
        an error past ``max_response_bytes`` (checked against Content-Length first)."""
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if limit is None and declared.isdigit() and int(declared) > cap:
            raise self._too_large(f"{int(declared):,} bytes (Content-Length)")
        pieces: list[bytes] = []
        size = 0
        try:
            while piece := response.raw.read1(
                READ_PIECE if limit is None else limit - size, decode_content=True
            ):
                pieces.append(piece)
                size += len(piece)
                if limit is not None and size >= limit:
                    return b"".join(pieces)
                if size > cap:
                    raise self._too_large(f"more than {cap:,} bytes")
                if time.monotonic() > deadline:
                    return None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if limit is not None:
                return b"".join(pieces)
            raise requests.ConnectionError(f"the page was cut off: {error}") from None
        response.raw.release_conn()  # read to its end: the connection serves the next request
        return b"".join(pieces)

    def _too_large(self, size: str) -> PipelineRequestError:
        return PipelineRequestError(
            f"the pipeline at {self.url} answered a page of {size}, over the client's cap of "
            f"{self.max_response_bytes:,} bytes: lower pipeline.fetch_size so that a page fits"
        )

    def _refusal(self, status: int, detail: str, params: dict[str, str | int]) -> Exception:
        """The error of a status that is not retried (403, 410, 400...)."""
        if status == 403:
            return NotEntitledError(
                f"the pipeline refused consumer {self.consumer!r} for client {self.credentials.client_id} "
                f"(403 {detail}): check pipeline.consumer, or ask Adobe to entitle this integration"
            )
        if status == 410:
            return JournalGoneError(
                f"position {params.get('since')!r} is older than the journal's retention (410)"
            )
        return PipelineRequestError(f"the pipeline rejected GET {self.url} {params} ({status} {detail})")


def _next_position(response: requests.Response) -> str | None:
    """The ``since`` of the Link header's ``rel="next"``, taken as given."""
    next_url = response.links.get("next", {}).get("url")
    since = parse_qs(urlsplit(next_url).query).get("since") if next_url else None
    return since[0] if since else None


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from this API, fall back to our own backoff
