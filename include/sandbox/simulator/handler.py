"""The simulator's HTTP endpoints: IMS (JWT exchange and OAuth), the journal with its statuses
(SPEC section 2), and the ``/_sim`` admin endpoints (faults, publish, stats)."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from include.sandbox.simulator.server import Simulator

log = logging.getLogger(__name__)

JOURNAL_LIMIT_MAX = 100_000


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    simulator: Simulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, timed out) is routine here: one line, no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.info("simulator: client %s went away (%s)", client_address, error)
            return
        super().handle_error(request, client_address)


class _Reply(Exception):
    """Ends request handling with this status and JSON error body."""

    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = headers or {}


class _Window(NamedTuple):
    """The journal indexes a request asks for: after ``after`` (None: from the first retained),
    ``start..end-1`` (empty when there is nothing new)."""

    after: int | None
    start: int
    end: int


def _retry_after_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class SimulatorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a draining client reuses its connection
    server_version = "AdobePipelineSimulator/1.0"
    server: SimulatorHTTPServer

    def setup(self) -> None:
        super().setup()
        # a page goes out in several writes; don't let Nagle hold the last small one back
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    # ---- plumbing
    def _send(
        self,
        status: int,
        body: bytes | list[bytes | memoryview] = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(sum(len(chunk) for chunk in chunks)))
        self.end_headers()
        if status != HTTPStatus.NO_CONTENT:
            for chunk in chunks:
                self.wfile.write(chunk)
        self.server.simulator.count_status(status, journal=urlsplit(self.path).path.startswith("/journal/"))

    def _send_json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(document).encode(), headers)

    def _read_body(self) -> bytes:
        return self._body

    def _dispatch(self, routes: dict[str, Any]) -> None:
        # read the whole body first so that a keep-alive connection stays in step whatever we answer
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        self._body = self.rfile.read(length) if length > 0 else b""
        path = urlsplit(self.path).path
        handler = routes.get(path)
        if handler is None and path.startswith("/journal/"):
            handler = self._journal
        try:
            if handler is None:
                raise _Reply(404, "not_found", f"no endpoint {path}")
            handler()
        except _Reply as reply:
            document = {"error": reply.error, "error_description": reply.description}
            self._send_json(reply.status, document, reply.headers)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/_sim/stats": self._stats})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(
            {
                "/ims/exchange/jwt": self._exchange_jwt,
                "/ims/token/v3": self._oauth_token,
                "/_sim/faults": self._admin_faults,
                "/_sim/publish": self._admin_publish,
            }
        )

    # ---- IMS
    def _form(self) -> dict[str, str]:
        fields = parse_qs(self._read_body().decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def _check_client(self, form: dict[str, str]) -> None:
        options = self.server.simulator.options
        if not (
            hmac.compare_digest(form.get("client_id", ""), options.client_id)
            and hmac.compare_digest(form.get("client_secret", ""), options.client_secret)
        ):
            raise _Reply(401, "invalid_client", "unknown client_id or wrong client_secret")

    def _issue(self, expires_in: float) -> dict[str, Any]:
        simulator = self.server.simulator
        token = simulator.tokens.issue(simulator.options.token_lifetime)
        simulator.count("tokens_issued")
        return {"token_type": "bearer", "access_token": token, "expires_in": expires_in}

    def _bases(self) -> set[str]:
        """The base URLs a client may know this server by (for aud and metascope claims)."""
        bases = {self.server.simulator.url}
        host = self.headers.get("Host")
        if host:
            bases.add(f"http://{host}")
        port = self.server.server_address[1]
        bases.update({f"http://localhost:{port}", f"http://127.0.0.1:{port}"})
        return bases

    def _exchange_jwt(self) -> None:
        options = self.server.simulator.options
        form = self._form()
        self._check_client(form)
        token = form.get("jwt_token", "")
        if not token:
            raise _Reply(400, "invalid_request", "jwt_token is missing")
        bases = self._bases()
        claims = self._jwt_claims(token, bases)
        if claims.get("sub") != options.technical_account_id:
            raise _Reply(400, "invalid_token", "sub is not the technical account id of this client")
        if float(claims["exp"]) - float(claims["iat"]) > 86400:
            raise _Reply(400, "invalid_token", "exp is more than 24 h after iat")
        scopes = [
            name
            for name, value in claims.items()
            if value is True and any(name.startswith(f"{base}/s/") for base in bases)
        ]
        if not scopes:
            raise _Reply(400, "invalid_scope", "the JWT has no metascope claim '{ims_url}/s/{scope}': true")
        self._send_json(200, self._issue(int(options.token_lifetime * 1000)))

    def _jwt_claims(self, token: str, bases: set[str]) -> dict[str, Any]:
        """The claims of a JWT signed by the account's key, for this client and organization."""
        import jwt  # PyJWT, only needed by this endpoint

        simulator = self.server.simulator
        options = simulator.options
        if simulator.public_key is None:
            raise _Reply(
                400,
                "invalid_signature",
                "the simulator has no public key to verify against; start it with --public-key PATH",
            )
        try:
            return jwt.decode(
                token,
                simulator.public_key,
                algorithms=["RS256"],
                audience=[f"{base}/c/{options.client_id}" for base in bases],
                issuer=options.org_id,
                options={"require": ["exp", "iat", "iss", "sub", "aud"]},
                leeway=30,
            )
        except jwt.InvalidSignatureError:
            raise _Reply(
                400, "invalid_signature", "the JWT signature does not match the account's public key"
            ) from None
        except jwt.ExpiredSignatureError:
            raise _Reply(400, "expired_token", "the JWT has expired (exp is in the past)") from None
        except jwt.PyJWTError as error:
            raise _Reply(400, "invalid_token", f"the JWT is not valid: {error}") from None

    def _oauth_token(self) -> None:
        form = self._form()
        if form.get("grant_type") != "client_credentials":
            raise _Reply(400, "unsupported_grant_type", "grant_type must be client_credentials")
        self._check_client(form)
        if not form.get("scope", "").strip():
            raise _Reply(400, "invalid_scope", "scope is missing (comma separated scopes)")
        self._send_json(200, self._issue(int(self.server.simulator.options.token_lifetime)))

    # ---- journal
    def _journal(self) -> None:
        simulator = self.server.simulator
        if self.command != "GET":
            raise _Reply(405, "method_not_allowed", "the journal is read with GET")
        self._inject_fault()
        consumer = self._check_entitlement()
        query = {
            name: values[-1]
            for name, values in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()
        }
        try:
            limit = int(query.get("limit", ""))
        except ValueError:
            limit = 0
        if not 1 <= limit <= JOURNAL_LIMIT_MAX:
            raise _Reply(400, "invalid_limit", f"limit must be an integer 1..{JOURNAL_LIMIT_MAX}")
        journal = simulator.journal
        window = self._window(query, limit)
        base = f"{simulator.url}/journal/{consumer}"
        if window.end <= window.start:
            headers = {"Retry-After": _retry_after_text(simulator.options.idle_retry_after)}
            if window.after is not None:
                headers["Link"] = (
                    f'<{base}?since={journal.codec.encode(window.after)}&limit={limit}>; rel="next"'
                )
            self._send(204, headers=headers)
            return
        page = journal.page(window.start, window.end)
        if page is None:
            raise _Reply(
                410, "position_gone", "the events after this position were purged meanwhile (retention)"
            )
        count = window.end - window.start
        body = [
            b'{"events":[',
            *page.chunks,
            f'],"_page":{{"last":"{page.last}","count":{count}}}}}'.encode(),
        ]
        replacement = simulator.faults.page_body(query.get("since"))
        if replacement is not None:
            body = [replacement]
        simulator.count("events_served", count)
        self._send(200, body, {"Link": f'<{base}?since={page.last}&limit={limit}>; rel="next"'})

    def _inject_fault(self) -> None:
        """Wait the slow-down, then answer with the next pending fault, if any."""
        faults = self.server.simulator.faults
        fault = faults.take()
        if faults.slow_seconds > 0:
            time.sleep(faults.slow_seconds)
        if fault is not None:
            status, retry_after = fault
            if retry_after is None and status in (429, 503):
                retry_after = 1.0
            headers = {"Retry-After": _retry_after_text(retry_after)} if retry_after is not None else {}
            raise _Reply(status, "simulated_fault", f"fault injected by the simulator ({status})", headers)

    def _check_entitlement(self) -> str:
        """Check the token, the headers and the consumer of a journal request; return the consumer."""
        simulator = self.server.simulator
        options = simulator.options
        authorization = self.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not simulator.tokens.valid(token.strip()):
            raise _Reply(
                401,
                "invalid_token",
                "the bearer token is missing, invalid or expired",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        api_key = self.headers.get("x-api-key")
        org = self.headers.get("x-ims-org-id")
        if not api_key or not org:
            raise _Reply(400, "missing_header", "x-api-key and x-ims-org-id headers are required")
        if api_key != options.client_id:
            raise _Reply(403, "invalid_api_key", "x-api-key is not the client_id of this token")
        if org != options.org_id:
            raise _Reply(403, "invalid_org", "x-ims-org-id is not the organization of these credentials")
        consumer = urlsplit(self.path).path[len("/journal/") :]
        if consumer != options.consumer:
            raise _Reply(403, "not_entitled", f"these credentials are not entitled to consumer {consumer!r}")
        return consumer

    def _window(self, query: dict[str, str], limit: int) -> _Window:
        """Where a read starts (``since``, ``latest=true`` or the first retained event) and ends."""
        journal = self.server.simulator.journal
        length, first = journal.length, journal.first_retained
        since = query.get("since")
        latest = query.get("latest", "").lower() == "true"
        if since is not None and latest:
            raise _Reply(400, "invalid_request", "give either since or latest=true, not both")
        if latest:
            after = length - 1  # jump to the end: nothing yet, the next link continues from there
            if after < first:
                after = None
        elif since is None:
            after = None
        else:
            after = journal.codec.decode(since)
            if after is None or after >= length:
                raise _Reply(400, "invalid_position", "since is not a position of this journal")
            if after + 1 < first:
                raise _Reply(
                    410,
                    "position_gone",
                    f"events after this position are older than the journal retention; "
                    f"{first - after - 1} events were purged",
                )
        start = first if after is None else after + 1
        end = min(length, start + limit) if not latest else start
        return _Window(after, start, end)

    # ---- admin
    def _admin_json(self) -> dict[str, Any]:
        try:
            document = json.loads(self._read_body() or b"{}")
        except ValueError:
            raise _Reply(400, "invalid_json", "the body must be a JSON object") from None
        if not isinstance(document, dict):
            raise _Reply(400, "invalid_json", "the body must be a JSON object")
        return document

    def _admin_faults(self) -> None:
        simulator = self.server.simulator
        document = self._admin_json()
        try:
            if document.get("clear"):
                simulator.faults.clear()
            if "status" in document:
                simulator.faults.fail_next(
                    int(document["status"]), int(document.get("count", 1)), document.get("retry_after")
                )
            if "slow_seconds" in document:
                simulator.faults.slow_seconds = float(document["slow_seconds"])
            if "share" in document:  # {"share": 0.2, "share_status": 503}: that share of requests fails
                simulator.faults.fail_share(int(document.get("share_status", 503)), float(document["share"]))
            if document.get("expire_tokens"):
                simulator.expire_tokens()
        except (TypeError, ValueError) as error:
            raise _Reply(400, "invalid_fault", f"bad fault settings: {error}") from None
        self._send_json(200, simulator.faults.describe())

    def _admin_publish(self) -> None:
        simulator = self.server.simulator
        document = self._admin_json()
        if "raw" in document:
            if not isinstance(document["raw"], list):
                raise _Reply(400, "invalid_publish", "raw must be a list of event objects")
            simulator.publish_raw(document["raw"])
        if "raw_base64" in document:  # events as exact bytes: invalid JSON or UTF-8, a hostile pipeline
            try:
                simulator.publish_raw_bytes(
                    [base64.b64decode(text, validate=True) for text in document["raw_base64"]]
                )
            except (TypeError, ValueError):
                raise _Reply(400, "invalid_publish", "raw_base64 must be a list of base64 strings") from None
        try:
            simulator.publish(int(document.get("count", 0)))
        except (TypeError, ValueError):
            raise _Reply(400, "invalid_publish", "count must be an integer") from None
        self._send_json(200, {"length": simulator.journal.length})

    def _stats(self) -> None:
        stats = self.server.simulator.stats
        for name in ("requests_by_status", "journal_requests"):
            stats[name] = {str(status): count for status, count in stats[name].items()}
        self._send_json(200, stats)
