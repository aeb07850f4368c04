"""A real local SMTP server (aiosmtpd) for the demo and the tests, with switchable faults.

``python -m include.cli smtp serve --port 8025 --maildir var/mail`` runs it in the foreground;
point ``smtp_default`` at it with ``{"conn_type": "smtp", "host": "127.0.0.1", "port": 8025,
"extra": {"disable_ssl": true, "disable_tls": true}}``.

It offers PIPELINING (RFC 2920) as real relays do (Postfix, Amazon SES...); ``pipelining=False``
makes it a server that does not. ``chunking=True`` also offers CHUNKING (RFC 3030: ``BDAT <size>
[LAST]``, the body as exactly that many bytes, no dot-stuffing). ``max_connections``: past that
many open connections it greets the next one with ``421 4.7.0 too many connections`` and closes
it, as real relays do (default: no cap).

Faults (all thread-safe, set from the test's thread while the server runs):
``fail_next(n, reply, at)`` answers 451 (or ``reply``; a 421 also closes the connection) to the
next n messages, after their DATA or at their MAIL FROM or RCPT TO; ``reject(addr)`` answers 550
at RCPT TO for that address; ``drop_next(n, at)`` closes the connection at the next n messages'
MAIL FROM, RCPT TO or after their DATA, without a reply and without storing them;
``outage_after(n, seconds)`` takes the server down right after it stored and acknowledged its n-th
message and brings it back on the same port; ``delay`` sleeps before each reply to a message
body; ``reply_delay`` before every reply line (a slow relay, greeting and MAIL FROM included).
A relay-wide refusal: ``credentials=...`` answers 530 to MAIL FROM without a login and 535 to a
wrong one; ``fail_next(n, "550 5.7.1 Sender refused", at="MAIL")`` or ``"554 5.7.1 Relay access
denied"`` at ``RCPT``.
``stop()`` / ``start()`` restart on the same port.

What it saw, for the tests: ``messages``, ``replies`` (every reply line it sent), ``reads`` (how
many reads from its clients), ``pipelined_groups`` (reads that brought MAIL FROM and RCPT TO
together), ``chunked_messages`` (ended by ``BDAT LAST``), ``refused_connections`` (greeted with
421), ``most_connections`` (open at once).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mailbox
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from include.sandbox.net import free_port

STAGES = ("MAIL", "RCPT", "DATA")  # where a fault strikes; DATA: once the message was received
_PIPELINED_GROUP = re.compile(rb"(?:^|\r\n)MAIL FROM:[^\r\n]*\r\nRCPT TO:")


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    received_at: float

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def __getitem__(self, header: str) -> Any:
        """A header of the parsed message, e.g. ``received["Subject"]``."""
        return self.message[header]

    @property
    def message_id(self) -> str | None:
        for line in self.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                return line.split(b":", 1)[1].strip().decode("ascii", "replace")
        return None


@dataclass
class Faults:
    temp_fail_remaining: int = 0
    temp_fail_reply: str = "451 4.3.0 Temporary local problem, try again later"
    temp_fail_at: str = "DATA"
    rejected: set[str] = field(default_factory=set)
    reject_reply: str = "550 5.1.1 Mailbox unavailable"
    drop_remaining: int = 0
    drop_at: str = "DATA"
    outage_at: int | None = None
    outage_seconds: float = 1.0
    delay: float = 0.0
    reply_delay: float = 0.0


class _Handler:
    def __init__(self, server: LocalSmtpServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.server.pipelining:  # aiosmtpd reads commands in order from its stream: it can
            responses.insert(-1, "250-PIPELINING")
        if self.server.chunking:
            responses.insert(-1, "250-CHUNKING")
        return responses

    def _fault(self, smtp: SMTP, stage: str) -> str | None:
        """The reply a fault set for ``stage`` gives, if any (under the lock)."""
        faults = self.server.faults
        if faults.drop_remaining > 0 and faults.drop_at == stage:
            faults.drop_remaining -= 1
            assert smtp.transport is not None
            smtp.transport.abort()  # no reply at all: the client sees a dropped connection
            return "421 4.3.2 closing"
        if faults.temp_fail_remaining > 0 and faults.temp_fail_at == stage:
            faults.temp_fail_remaining -= 1
            if faults.temp_fail_reply.startswith("421"):  # closing: once this reply has gone
                asyncio.get_running_loop().call_soon(smtp.transport.close)  # type: ignore[union-attr]
            return faults.temp_fail_reply
        return None

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.server._lock:
            refused = self._fault(smtp, "MAIL")
        if refused:
            return refused
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.server._refusing:
            assert smtp.transport is not None
            smtp.transport.abort()
            return "421 4.3.2 going down"
        with self.server._lock:
            refused = self._fault(smtp, "RCPT")
            if refused:
                return refused
            if address.lower() in self.server.faults.rejected:
                return self.server.faults.reject_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        server = self.server
        faults = server.faults
        if faults.delay:
            await asyncio.sleep(faults.delay)
        with server._lock:
            if server._refusing:
                assert smtp.transport is not None
                smtp.transport.abort()
                return "421 4.3.2 closing"
            refused = self._fault(smtp, "DATA")
            if refused:
                return refused
            data = envelope.original_content or envelope.content or b""
            if isinstance(data, str):
                data = data.encode("utf-8")
            received = ReceivedMessage(str(envelope.mail_from), tuple(envelope.rcpt_tos), data, time.time())
            server.messages.append(received)
            count = len(server.messages)
            outage = faults.outage_at is not None and count >= faults.outage_at
            if outage:
                faults.outage_at = None
                server._refusing = True  # set before the 250 leaves: nothing after it is stored
        if server._maildir is not None:
            server._maildir.add(data)
        if outage:
            threading.Thread(target=server._outage, args=(faults.outage_seconds,), daemon=True).start()
        return f"250 2.0.0 OK queued as {count}"


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, keeping its replies and counting pipelined command groups."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.local_server = handler.server
        self.chunks: list[bytes] = []  # the BDAT chunks of the current message
        self.over_cap = False
        self.counted = False

    def connection_made(self, transport: Any) -> None:
        server = self.local_server
        if not self.counted:  # once per connection (STARTTLS calls this again)
            self.counted = True
            server.open_connections += 1
            server.most_connections = max(server.most_connections, server.open_connections)
            cap = server.max_connections
            self.over_cap = cap is not None and server.open_connections > cap
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.local_server.open_connections -= 1
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.over_cap:  # as a relay at its limit: this greeting, then the connection closes
            self.local_server.refused_connections += 1
            await self.push("421 4.7.0 too many connections")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030: ``BDAT <size> [LAST]``, then exactly size bytes of the body."""
        if not self.local_server.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        words = (arg or "").split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or words[1:] not in ([], ["LAST"]):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        size, last = int(words[0]), len(words) == 2
        self.chunks.append(await self._reader.readexactly(size))  # read whatever follows
        assert self.envelope is not None
        if await self.check_helo_needed() or await self.check_auth_needed("BDAT"):
            self.chunks = []
            return
        if not self.envelope.rcpt_tos:
            self.chunks = []
            if last:  # BDAT LAST ends the transaction whatever its reply (as the end of DATA does)
                self._set_post_data_state()
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        data, self.chunks = b"".join(self.chunks), []
        self.local_server.chunked_messages += 1
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    def data_received(self, data: bytes) -> None:
        self.local_server.reads += 1
        if _PIPELINED_GROUP.search(data):
            self.local_server.pipelined_groups += 1
        super().data_received(data)

    async def push(self, status: AnyStr) -> None:
        if self.local_server.faults.reply_delay:
            await asyncio.sleep(self.local_server.faults.reply_delay)
        self.local_server.replies.append(
            status if isinstance(status, str) else status.decode("utf-8", "replace")
        )
        await super().push(status)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)


class LocalSmtpServer:
    """An aiosmtpd server in a background thread that keeps what it receives."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        maildir: str | Path | None = None,
        credentials: tuple[str, str] | None = None,
        pipelining: bool = True,
        chunking: bool = False,
        max_connections: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.pipelining = pipelining
        self.chunking = chunking
        self.max_connections = max_connections
        self.open_connections = 0
        self.refused_connections = 0  # greeted with 421 too many connections
        self.chunked_messages = 0  # ended by BDAT LAST
        self.most_connections = 0  # the most open at once
        self.messages: list[ReceivedMessage] = []
        self.replies: list[str] = []
        self.reads = 0
        self.pipelined_groups = 0
        self.faults = Faults()
        self.credentials = credentials
        self._lock = threading.RLock()
        self._refusing = False
        self._controller: Controller | None = None
        self._maildir = mailbox.Maildir(str(maildir), create=True) if maildir else None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalSmtpServer:
        if self._controller is not None:
            return self
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:  # aiosmtpd logs every SMTP command at INFO
            mail_log.setLevel(logging.WARNING)
        kwargs: dict[str, Any] = {"decode_data": False, "data_size_limit": 10 * 1024 * 1024}
        if self.credentials:  # plain AUTH on loopback: this server is for tests and the demo only
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False, auth_required=True)
        controller = _Controller(
            _Handler(self), hostname=self.host, port=self.port, ready_timeout=10, server_kwargs=kwargs
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> LocalSmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _outage(self, seconds: float) -> None:
        self.stop()
        time.sleep(seconds)
        self._refusing = False
        self.start()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.credentials is not None
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)

    # -- faults ----------------------------------------------------------------------------
    def fail_next(self, count: int, reply: str | None = None, at: str = "DATA") -> None:
        if at not in STAGES:
            raise ValueError(f"at must be one of {STAGES}")
        with self._lock:
            self.faults.temp_fail_remaining = count
            self.faults.temp_fail_at = at
            if reply:
                self.faults.temp_fail_reply = reply

    def reject(self, *addresses: str, reply: str | None = None) -> None:
        with self._lock:
            self.faults.rejected.update(a.lower() for a in addresses)
            if reply:
                self.faults.reject_reply = reply

    def drop_next(self, count: int, at: str = "DATA") -> None:
        if at not in STAGES:
            raise ValueError(f"at must be one of {STAGES}")
        with self._lock:
            self.faults.drop_remaining = count
            self.faults.drop_at = at

    def outage_after(self, count: int, seconds: float = 1.0) -> None:
        with self._lock:
            self.faults.outage_at = count
            self.faults.outage_seconds = seconds

    # -- inspection ------------------------------------------------------------------------
    def message_ids(self) -> list[str | None]:
        with self._lock:
            return [m.message_id for m in self.messages]

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return True
            time.sleep(0.01)
        return len(self.messages) >= count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="smtp_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser("serve", help="run a local SMTP server that keeps every message")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8025)
    serve.add_argument("--maildir", default=None, help="also store each message in this Maildir folder")
    serve.add_argument("--no-pipelining", action="store_true", help="do not offer PIPELINING (RFC 2920)")
    serve.add_argument("--chunking", action="store_true", help="offer CHUNKING (BDAT, RFC 3030)")
    serve.add_argument(
        "--max-connections", type=int, default=None, help="greet connections past this many with 421"
    )
    serve.add_argument("--quiet", action="store_true", help="print no count of messages received")


def main(args: argparse.Namespace) -> int:
    server = LocalSmtpServer(
        args.host,
        args.port,
        maildir=args.maildir,
        pipelining=not args.no_pipelining,
        chunking=args.chunking,
        max_connections=args.max_connections,
    ).start()
    where = f", Maildir {args.maildir}" if args.maildir else ""
    print(f"SMTP server on {args.host}:{server.port}{where}; Ctrl-C stops it", flush=True)
    try:
        count = 0
        while True:
            time.sleep(1)
            if len(server.messages) != count and not args.quiet:
                count = len(server.messages)
                print(f"{count} messages received", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
