"""``python -m include.cli unsubscribe serve --host H --port P``: the unsubscribe endpoint on its
own, for a sender who does not expose Airflow's api-server.

It answers at the path of ``TRIGGERS_UNSUBSCRIBE_URL`` (e.g. ``https://u.shop.example/u/{token}``
-> ``/u/<token>``; a ``?t={token}`` query works too) and 404 elsewhere; the handling is
:func:`include.suppressions.endpoint.answer`, the same as the plugin's. Put TLS in front of it
(a reverse proxy): the URL in the emails is https.
"""

from __future__ import annotations

import argparse
import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from sqlalchemy import Engine

from include.errors import ConfigError
from include.suppressions.endpoint import MAX_BODY_BYTES, Answer, answer, page, token_from_request
from include.suppressions.unsubscribe import DEFAULT_URL, URL_ENV

log = logging.getLogger(__name__)


class UnsubscribeServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the engine and the URL template of the links."""

    daemon_threads = True

    def __init__(self, engine: Engine, url_template: str, address: tuple[str, int]) -> None:
        self.engine = engine
        self.url_template = url_template
        super().__init__(address, UnsubscribeHandler)


class UnsubscribeHandler(BaseHTTPRequestHandler):
    server: UnsubscribeServer
    server_version = "triggers-unsubscribe"
    sys_version = ""

    def _handle(self, method: str) -> None:
        target = urlsplit(self.path)
        token = token_from_request(self.server.url_template, target.path, target.query)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if token is None:
            result: Answer = page(404, "Not found", "Nothing here.")
        elif length < 0 or length > MAX_BODY_BYTES:
            result = page(413, "Too large", "An unsubscribe request is one short form field.")
        else:
            body = self.rfile.read(length) if length else b""
            result = answer(self.server.engine, method, token, body, self.headers.get("Content-Type"))
        self._send(result, head=method == "HEAD")

    def _send(self, result: Answer, head: bool) -> None:
        data = result.body.encode("utf-8")
        self.send_response(result.status)
        for name, value in result.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if result.status == 413:  # the unread body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # the path holds the token: log the method and status only
        log.info("unsubscribe %s -> %s", self.command, args[1] if len(args) > 1 else "")


def make_server(engine: Engine, url_template: str, host: str, port: int) -> UnsubscribeServer:
    """A server (not started) answering unsubscribe requests for links made from ``url_template``."""
    if "{token}" not in url_template:
        raise ConfigError(f"{URL_ENV} {url_template[:100]!r} has no {{token}}; put it where the token goes")
    return UnsubscribeServer(engine, url_template, (host, port))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="answer one-click unsubscribe requests (RFC 8058)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8025)


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted, at the path of TRIGGERS_UNSUBSCRIBE_URL."""
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    url_template = os.environ.get(URL_ENV) or DEFAULT_URL
    with open_resources() as res:
        server = make_server(res.engine, url_template, args.host, args.port)
        print(
            f"unsubscribe endpoint on http://{args.host}:{server.server_port}{urlsplit(url_template).path}",
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0
