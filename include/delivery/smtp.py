"""The SMTP protocol as the sender speaks it: one session per connection, PIPELINING (RFC 2920),
CHUNKING (RFC 3030: ``BDAT``, several messages in flight on one connection).

:class:`SmtpSettings` is what a session needs (built by :class:`~include.delivery.hook.PipeliningSmtpHook`
from the provider's reading of ``smtp_default``); :func:`open_client` connects, greets, starts TLS
and logs in; :class:`SmtpSession` sends messages on one connection, reopened when it drops.
A relay that greets with 421 (too many connections) raises :class:`RelayBusy`: the pool of
sessions shrinks instead of failing deliveries.
"""

from __future__ import annotations

import math
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from include.delivery.render import RenderedEmail
from include.errors import RelayRefusedError, SmtpUnavailableError


@dataclass(frozen=True)
class SmtpSettings:
    """What a sending session needs to reach the relay.

    ``use_ssl``: SMTP over SSL (port 465 by default); ``starttls``: STARTTLS on a plain
    connection (never inside an SSL one); ``retry_limit``: connection attempts after the first,
    and reconnections after a drop; ``from_email``: the envelope sender of every message, else
    the campaign's sender.
    """

    host: str = "localhost"
    port: int | None = None
    login: str = ""
    password: str = field(default="", repr=False)
    use_ssl: bool = True
    starttls: bool = True
    timeout: float = 30.0
    retry_limit: int = 5
    from_email: str | None = None
    verify_certificates: bool = True
    max_connections: int | None = None  # the relay's cap on our concurrent sessions (extra max_connections)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port or (465 if self.use_ssl else 25)}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.verify_certificates:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class RelayBusy(Exception):
    """The relay greeted with 421 (too many connections): no message was attempted."""


def _greeted(settings: SmtpSettings) -> smtplib.SMTP:
    try:
        if settings.use_ssl:
            return smtplib.SMTP_SSL(
                settings.host, settings.port or 465, timeout=settings.timeout, context=settings.ssl_context()
            )
        return smtplib.SMTP(settings.host, settings.port or 25, timeout=settings.timeout)
    except smtplib.SMTPConnectError as error:
        if error.smtp_code == 421:
            raise RelayBusy(
                f"SMTP relay {settings.address} is busy: {reply_text(421, error.smtp_error)}"
            ) from None
        raise


def open_client(settings: SmtpSettings) -> smtplib.SMTP:
    """A connected, greeted and logged-in client. Login errors never show the password.
    ``client.round_trip``: the seconds its EHLO took (one round trip: the relay's distance)."""
    client = _greeted(settings)
    try:
        started = time.perf_counter()
        client.ehlo()
        client.round_trip = time.perf_counter() - started  # type: ignore[attr-defined]
        if settings.starttls and not settings.use_ssl:
            client.starttls(context=settings.ssl_context())
            client.ehlo()
        if settings.login and settings.password:
            client.login(settings.login, settings.password)
    except smtplib.SMTPNotSupportedError:
        client.close()
        raise SmtpUnavailableError(
            f"SMTP relay {settings.address} does not offer STARTTLS; set extra disable_tls: true only if it "
            "is on a trusted network, or use disable_ssl: false with its SSL port"
        ) from None
    except smtplib.SMTPAuthenticationError as error:
        client.close()
        raise RelayRefusedError(
            f"SMTP relay {settings.address} refused the login of {settings.login!r} ({error.smtp_code}); "
            "check the smtp_default connection's login and password"
        ) from None
    except BaseException:
        client.close()
        raise
    return client


def reply_text(code: int, message: bytes | str) -> str:
    """A reply as recorded: its code and text on one line, at most 500 characters."""
    text_ = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text_.split())}"[:500]


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA body as it goes on the wire: a second dot before each line that starts with one,
    then the end mark (RFC 5321 4.5.2); the same bytes as smtplib's ``data`` without its regex."""
    body = data.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")


_ACCEPTED = ((250,), (250, 251), (354,))  # what MAIL, RCPT and DATA answer when all is well
_STAGES = ("MAIL", "RCPT", "DATA")
_AUTH_REFUSALS = {530, 534, 535, 538}  # RFC 4954: authentication required, too weak, refused


class ClaimExpired(Exception):
    """The claim got older than the sender may use before the body went: it must not go."""


def relay_wide(code: int, message: bytes, stage: str) -> bool:
    """A 5xx that says the relay takes no message from us, whatever the recipient: authentication
    required or refused, the sender refused (at MAIL FROM), relaying denied."""
    return code >= 500 and (code in _AUTH_REFUSALS or stage == "MAIL" or b"relay" in message.lower())


class Reply(NamedTuple):
    """How one message's transaction ended."""

    code: int  # the reply to its body, or the first refusal
    message: bytes
    body_sent: bool
    following_sent: bool  # the next message's MAIL, RCPT and DATA went behind the body
    stage: str = "BODY"  # where it ended: MAIL, RCPT, DATA (refused before the body) or BODY


def _transaction(
    client: smtplib.SMTP,
    commands: tuple[bytes, bytes, bytes],
    data: bytes,
    *,
    opened: bool = False,
    following: bytes = b"",
    before_body: Callable[[], None] = lambda: None,
) -> Reply:
    """One message.

    When the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go in one write and their
    three replies are read together; the body goes only once all three were accepted, with the
    next message's MAIL, RCPT and DATA (``following``) in the same write: one round trip per
    message. ``opened``: this message's commands already went that way. Without PIPELINING
    each command waits for its reply. ``before_body`` runs right before the body goes: it may
    raise :class:`ClaimExpired` (the caller drops the connection, which ends the transaction unsent).
    """
    pipelining = client.has_extn("pipelining")
    if pipelining and not opened:
        client.send(b"".join(commands))
    replies = []
    for command, accepted, stage in zip(commands, _ACCEPTED, _STAGES, strict=True):
        if not pipelining:
            client.send(command)
        code, message = client.getreply()
        replies.append((code, message))
        if code == 421 or (code not in accepted and not pipelining):  # 421: closing, no further reply
            return Reply(code, message, False, False, stage)
    if all(reply[0] in accepted for reply, accepted in zip(replies, _ACCEPTED, strict=True)):
        before_body()  # right before the body: a reconnect loop may have waited
        chained = pipelining and bool(following)
        client.send(_dot_stuffed(data) + following if chained else _dot_stuffed(data))
        code, message = client.getreply()
        return Reply(code, message, True, chained and code != 421)
    if replies[2][0] == 354:
        client.send(b".\r\n")  # RFC 2920 3.1: DATA accepted though no recipient was: end it empty
        client.getreply()
    for (code, message), accepted, stage in zip(replies, _ACCEPTED, _STAGES, strict=True):
        if code not in accepted and code >= 400:
            return Reply(code, message, False, False, stage)
    client.close()  # DATA answered neither 354 nor an error: the server is out of step with us
    raise smtplib.SMTPServerDisconnected(f"DATA answered {replies[2][0]}")


def chunked_message(commands: tuple[bytes, bytes, bytes], data: bytes) -> bytes:
    """MAIL, RCPT and ``BDAT <size> LAST`` with the body as it is (RFC 3030: no dot-stuffing)."""
    return b"".join((commands[0], commands[1], b"BDAT %d LAST\r\n" % len(data), data))


def chunked_reply(client: smtplib.SMTP) -> Reply:
    """The three replies of one message sent with :func:`chunked_message`, in order: the first
    refusal is the message's reply (a refused RCPT makes the BDAT fail too). A 421 ends the
    reading: the relay closes the connection and answers nothing more."""
    replies = []
    for stage in _STAGES:
        code, message = client.getreply()
        if code == 421:
            return Reply(code, message, stage == "DATA", False, stage if stage != "DATA" else "BODY")
        replies.append((code, message))
    for (code, message), accepted, stage in zip(replies, _ACCEPTED[:2] + ((250,),), _STAGES, strict=True):
        if code not in accepted:
            return Reply(code, message, stage == "DATA", False, stage if stage != "DATA" else "BODY")
    return Reply(replies[2][0], replies[2][1], True, False)


class Sent(NamedTuple):
    """What became of a message: ``outcome`` is sent, failed (5xx), retry (4xx, dropped), relay
    (a 5xx refusing every message: :func:`relay_wide`) or release (the claim expired unsent)."""

    outcome: str
    reply: str
    following_sent: bool


class SmtpSession:
    """One connection to the relay, opened on first use and reopened when it drops.

    ``envelope_from`` (the connection's ``from_email``) replaces each message's own envelope
    sender; ``count`` receives ``reconnects`` and ``connection_drops``.
    """

    def __init__(
        self, settings: SmtpSettings, envelope_from: str | None, count: Callable[[str], None]
    ) -> None:
        self.settings = settings
        self.envelope_from = envelope_from
        self.count = count
        self.client: smtplib.SMTP | None = None
        # the current send's body was written (maybe in part) on a connection that then dropped:
        # the relay may have the message, so giving it back counts as an attempt
        self.body_went = False
        self.round_trip: float | None = None  # the EHLO of the first connection

    def connect(self) -> smtplib.SMTP:
        """The open connection, else a new one (:class:`RelayBusy`, :class:`SmtpUnavailableError`)."""
        if self.client is None:
            self.client = self._connect()
            if self.round_trip is None:
                self.round_trip = getattr(self.client, "round_trip", None)
        return self.client

    @property
    def chunking(self) -> bool:
        """The open connection offers CHUNKING and PIPELINING: messages go as MAIL, RCPT, BDAT LAST
        and the body, several in flight, their replies read in order."""
        client = self.client
        return client is not None and client.has_extn("chunking") and client.has_extn("pipelining")

    def write_chunked(self, message: RenderedEmail) -> None:
        """Send ``message`` without waiting (:meth:`read_chunked` reads its replies)."""
        if self.client is None:
            raise smtplib.SMTPServerDisconnected("the connection was closed")
        self.client.send(chunked_message(self.commands(message), message.data))

    def read_chunked(self) -> Sent:
        """The outcome of the oldest message written by :meth:`write_chunked`; a dropped
        connection raises (the caller reconnects and writes the unanswered ones again)."""
        assert self.client is not None
        code, message, body_sent, _, stage = chunked_reply(self.client)
        reply = reply_text(code, message)
        if code == 250 and body_sent:
            return Sent("sent", reply, False)
        if code == 421:
            self._drop()
            return Sent("retry", reply, False)
        if 400 <= code < 500:
            return Sent("retry", reply, False)
        return Sent("relay" if relay_wide(code, message, stage) else "failed", reply, False)

    def commands(self, message: RenderedEmail) -> tuple[bytes, bytes, bytes]:
        """MAIL, RCPT, DATA; both addresses passed normalize_email: ASCII local@domain, nothing to quote."""
        envelope_from = self.envelope_from or message.envelope_from
        return (
            f"MAIL FROM:<{envelope_from}>\r\n".encode("ascii"),
            f"RCPT TO:<{message.envelope_to}>\r\n".encode("ascii"),
            b"DATA\r\n",
        )

    def send(
        self,
        message: RenderedEmail,
        *,
        opened: bool,
        following: RenderedEmail | None,
        expires: float = math.inf,
        pace: Callable[[], None] = lambda: None,
    ) -> Sent:
        """Send ``message``; ``following``'s commands go behind its body when they can.
        ``opened``: ``message``'s commands went behind the previous body. A dropped connection is
        retried on a new one (after ``pace``: its rate-limit slot), up to ``retry_limit`` times;
        :class:`SmtpUnavailableError` when no new one can be made (:attr:`body_went` says whether
        the relay may have it). Once ``expires`` (``time.monotonic()``) has passed, the body does
        not go: outcome ``release``, or ``retry`` when it went before a drop (an attempt)."""
        commands = self.commands(message)
        chained = b"".join(self.commands(following)) if following is not None else b""
        drops = 0
        self.body_went = False

        def before_body() -> None:
            if time.monotonic() > expires:
                raise ClaimExpired
            self.body_went = True

        while True:
            if self.client is None:
                self.connect()
                opened = False
            assert self.client is not None
            try:
                return self._send_once(self.client, commands, message.data, opened, chained, before_body)
            except ClaimExpired:
                self._drop()  # the relay discards a transaction whose body never ended
                if self.body_went:
                    return Sent("retry", "claim too old to send again after a dropped connection", False)
                return Sent("release", "claim too old to send", False)
            except (smtplib.SMTPServerDisconnected, OSError) as error:
                self._drop()
                drops += 1
                self.count("connection_drops")
                if drops > self.settings.retry_limit:
                    return Sent("retry", f"connection lost: {type(error).__name__}", False)
                time.sleep(min(0.1 * 2 ** (drops - 1), 5.0))
                pace()  # a message sent again takes a rate-limit slot of its own

    def _send_once(
        self,
        client: smtplib.SMTP,
        commands: tuple[bytes, bytes, bytes],
        data: bytes,
        opened: bool,
        chained: bytes,
        before_body: Callable[[], None],
    ) -> Sent:
        code, message, body_sent, following_sent, stage = _transaction(
            client, commands, data, opened=opened, following=chained, before_body=before_body
        )
        reply = reply_text(code, message)
        if code == 250 and body_sent:
            return Sent("sent", reply, following_sent)
        if code == 421:  # the server is closing this connection
            self._drop()
            return Sent("retry", reply, False)
        if not body_sent:  # refused before the body: end the transaction (after it, it has ended)
            try:
                client.rset()
            except smtplib.SMTPServerDisconnected:
                self._drop()
        if 400 <= code < 500:
            return Sent("retry", reply, following_sent)
        return Sent("relay" if relay_wide(code, message, stage) else "failed", reply, following_sent)

    def _connect(self) -> smtplib.SMTP:
        delay = 0.2
        for attempt in range(self.settings.retry_limit + 1):
            try:
                return open_client(self.settings)
            except (SmtpUnavailableError, RelayBusy):
                raise
            except (OSError, smtplib.SMTPException) as error:
                if attempt == self.settings.retry_limit:
                    raise SmtpUnavailableError(
                        f"cannot reach the SMTP relay {self.settings.address} after {attempt + 1} attempts: "
                        f"{type(error).__name__}: {error}"[:300]
                    ) from None
                self.count("reconnects")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def drop(self) -> None:
        """Close the connection at once (no QUIT): a later send opens a new one."""
        self._drop()

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        """QUIT, or just close when the connection is already broken."""
        if self.client is not None:
            try:
                self.client.quit()
            except (smtplib.SMTPException, OSError):
                self.client.close()
            self.client = None
