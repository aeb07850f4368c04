"""Rendering one email from a campaign's Jinja2 template set (SPEC section 6).

A set ``NAME`` is ``NAME.subject.j2``, ``NAME.txt.j2`` and ``NAME.html.j2`` in the templates folder;
``NAME.fr_FR.*`` (then ``NAME.fr.*``) is used for a recipient whose ``locale`` is ``fr_FR`` when
all three of its files exist. Only ``.html.j2`` templates autoescape. Templates run with
``StrictUndefined``: a typo or a missing value fails that delivery (``template_error: ...``)
rather than sending "Hello ,"; read optional dimensions with ``event.dimensions.get("products", [])``.

The message is serialised here, not by the ``email`` package: building and flattening an
``EmailMessage`` costs about 4 ms, more than sending it. Safety does not rest on the
serialiser's care but on construction: an address is accepted only if it is one plain
``local@domain`` (else :class:`InvalidEmailError`, the delivery is suppressed ``invalid_email``);
every other header value built from data has its control characters (CR, LF...) removed and is
written as a quoted string or RFC 2047 encoded words, so it can neither end its header line nor
add a recipient. The tests parse the output with the standard library's strict parser.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import jinja2

from include.bounces.verp import bounce_address_for, bounce_address_template
from include.errors import ConfigError, InvalidEmailError, TemplateRenderError
from include.suppressions.addresses import ATEXT as _ATEXT
from include.suppressions.addresses import LOCAL_PART as _LOCAL_PART
from include.suppressions.addresses import normalize_email
from include.suppressions.unsubscribe import DEFAULT_URL as DEFAULT_UNSUBSCRIBE_URL
from include.suppressions.unsubscribe import URL_ENV as UNSUBSCRIBE_URL_ENV

UNSUBSCRIBE_MAILTO_ENV = "TRIGGERS_UNSUBSCRIBE_MAILTO"
PARTS = ("subject", "txt", "html")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PLAIN_PHRASE = re.compile(rf"[{_ATEXT} ]*")
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[_-]([A-Za-z0-9]{2,8}))?")
_URL_FORBIDDEN = re.compile(r"[\s<>\",\x00-\x1f\x7f]")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote(safe="") leaves as is
_ENCODED_CHUNK_BYTES = 45  # base64 of 45 bytes = 60 chars: "=?utf-8?b?" + 60 + "?=" <= 75 (RFC 2047)


class CampaignLike(Protocol):
    id: str
    template: str
    sender: str


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """What SMTP needs: the envelope (never read from headers) and the message bytes (CRLF)."""

    envelope_from: str
    envelope_to: str
    data: bytes
    message_id: str


def clean_header_text(value: Any) -> str:
    """One line of text: control characters (CR, LF, NUL...) become spaces, runs of space one."""
    return " ".join(_CONTROL.sub(" ", "" if value is None else str(value)).split())


def _encoded_words(text: str) -> str:
    """RFC 2047 base64 encoded words, folded (CRLF SP) between words."""
    words, chunk, size = [], [], 0
    for char in text:
        length = len(char.encode("utf-8"))
        if size + length > _ENCODED_CHUNK_BYTES:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += length
    if chunk:
        words.append("".join(chunk))
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words)


def encode_unstructured(value: Any) -> str:
    """A Subject-like header value: plain ASCII as is, anything else as encoded words."""
    text = clean_header_text(value)
    if text.isascii() and len(text) <= 900 and "=?" not in text:
        return text
    return _encoded_words(text)


def encode_phrase(value: Any) -> str:
    """A display name: an atom phrase, else a quoted string, else encoded words."""
    text = clean_header_text(value)
    if not text:
        return ""
    if not text.isascii() or len(text) > 70 or "=?" in text:
        return _encoded_words(text)
    if _PLAIN_PHRASE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_address(display_name: Any, address: str) -> str:
    """``Name <addr>`` for an address already checked by :func:`normalize_email`."""
    phrase = encode_phrase(display_name)
    return f"{phrase} <{address}>" if phrase else address


def parse_sender(sender: str) -> tuple[str, str]:
    """A campaign's ``sender`` ("Shop <shop@example.com>") -> (header value, envelope address)."""
    name, address = parseaddr(sender)
    try:
        address = normalize_email(address)
    except InvalidEmailError:
        raise InvalidEmailError(
            f"campaign sender {sender!r} is not 'Name <address>' with one valid address"
        ) from None
    return format_address(name, address), address


def message_id_for(delivery_id: str, domain: str) -> str:
    """``<delivery_id@domain>``; an id that is not a dot-atom is replaced by its SHA-1 (stable)."""
    left = str(delivery_id)
    if not _LOCAL_PART.fullmatch(left) or len(left) > 200:
        left = hashlib.sha1(left.encode("utf-8")).hexdigest()
    return f"<{left}@{domain}>"


def unsubscribe_url_template(explicit: str | None = None) -> str:
    """The one-click URL template: ``explicit``, else ``TRIGGERS_UNSUBSCRIBE_URL``, else the placeholder."""
    return explicit or os.environ.get(UNSUBSCRIBE_URL_ENV) or DEFAULT_UNSUBSCRIBE_URL


def unsubscribe_url_for(
    delivery_id: str,
    campaign_id: str,
    recipient_id: str | None = None,
    template: str | None = None,
    token: str = "",
) -> str:
    """The one-click unsubscribe URL: ``TRIGGERS_UNSUBSCRIBE_URL`` with ``{token}`` (the signed
    token of :mod:`include.suppressions.unsubscribe`; without it the link unsubscribes no one) and
    ``{delivery_id}``, ``{campaign_id}``, ``{recipient_id}`` filled in, URL-quoted."""
    return unsubscribe_url_template(template).format(
        token=_url_part(token),
        delivery_id=_url_part(delivery_id),
        campaign_id=_url_part(campaign_id),
        recipient_id=_url_part(recipient_id or ""),
    )


def check_unsubscribe_url_is_set(unsubscribe_url: str, relay_host: str) -> None:
    """Refuse the placeholder ``DEFAULT_UNSUBSCRIBE_URL`` unless the relay is on this machine (a
    test or a demo): real recipients would get a link that unsubscribes no one."""
    if unsubscribe_url != DEFAULT_UNSUBSCRIBE_URL or _on_loopback(relay_host):
        return
    raise ConfigError(
        f"{UNSUBSCRIBE_URL_ENV} is not set: the emails would carry the placeholder {DEFAULT_UNSUBSCRIBE_URL}; "
        "set it to the public URL of the unsubscribe endpoint with {token} (e.g. "
        "https://airflow.example.com/triggers/unsubscribe/{token}, or where `cli unsubscribe serve` runs)"
    )


def _on_loopback(host: str) -> bool:
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_delivery_settings(
    unsubscribe_url: str,
    unsubscribe_mailto: str | None,
    senders: Mapping[str, str],
    envelope_from: str | None,
) -> None:
    """Refuse, before anything is claimed, a setting that every message uses: else each delivery
    would fail one by one for the same reason. :class:`ConfigError` names the setting."""
    try:
        sample = unsubscribe_url_for("d1", "c1", "r1", unsubscribe_url, token="t1")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"{UNSUBSCRIBE_URL_ENV} {unsubscribe_url[:100]!r}: only {{token}}, {{delivery_id}}, {{campaign_id}} "
            f"and {{recipient_id}} may appear in braces ({type(error).__name__}: {error})"
        ) from None
    if "{token}" not in unsubscribe_url:
        raise ConfigError(
            f"{UNSUBSCRIBE_URL_ENV} {unsubscribe_url[:100]!r} has no {{token}}: the link would unsubscribe "
            "no one; put {token} in its path or query, e.g. https://shop.example/unsubscribe/{token}"
        )
    if _URL_FORBIDDEN.search(sample) or not sample.lower().startswith(("https://", "http://")):
        raise ConfigError(
            f"{UNSUBSCRIBE_URL_ENV} {unsubscribe_url[:100]!r} must be an http(s) URL without spaces, "
            "quotes, commas or brackets"
        )
    checks = [(UNSUBSCRIBE_MAILTO_ENV, unsubscribe_mailto, normalize_email)] if unsubscribe_mailto else []
    checks += [(f"campaign {cid!r} sender", sender, parse_sender) for cid, sender in senders.items()]
    if envelope_from:
        checks.append(("smtp_default extra from_email", envelope_from, normalize_email))
    for name, value, check in checks:
        try:
            check(value)
        except InvalidEmailError:
            raise ConfigError(f"{name} {value[:100]!r} is not one valid email address") from None


def _url_part(value: Any) -> str:
    text = str(value)
    return text if _URL_SAFE.fullmatch(text) else quote(text, safe="")  # quote() costs ~15 µs


def event_context(
    trigger_id: str | None, event_time: float | None, dimensions: Mapping[str, list[Any]] | None
) -> dict[str, Any]:
    """What a template sees as ``event``: trigger_id, time (aware, UTC), dimensions name -> values."""
    return {
        "trigger_id": trigger_id,
        "time": datetime.fromtimestamp(float(event_time), tz=UTC) if event_time is not None else None,
        "dimensions": {str(k).strip(): list(v) for k, v in (dimensions or {}).items()},
    }


def _quoted_printable(text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\r", "\n")
    if not body.endswith("\n"):
        body += "\n"
    return binascii.b2a_qp(body.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


def _multipart_alternative(headers: str, text: str, html: str, message_id: str) -> bytes:
    """The message: ``headers`` (CRLF-ended lines), then the text and HTML parts."""
    # "=_" cannot occur in quoted-printable text, so the boundary need not be secret or random: one
    # per Message-ID makes a message the same bytes every time it is rendered (a preview, a retry)
    boundary = f"=_{hashlib.sha1(message_id.encode('utf-8')).hexdigest()[:24]}"
    head = (
        f"{headers}"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii")
    html_head = (
        f"--{boundary}\r\n"
        'Content-Type: text/html; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii")
    parts = (
        head,
        _quoted_printable(text),
        html_head,
        _quoted_printable(html),
        f"--{boundary}--\r\n".encode("ascii"),
    )
    return b"".join(parts)


class Renderer:
    """Compiles each template set once and renders messages from it."""

    def __init__(
        self, templates_dir: str | os.PathLike[str], *, unsubscribe_mailto: str | None = None
    ) -> None:
        self.templates_dir = Path(templates_dir)
        self.environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.templates_dir)),
            autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            keep_trailing_newline=False,
        )
        self.unsubscribe_mailto = (
            unsubscribe_mailto if unsubscribe_mailto is not None else os.environ.get(UNSUBSCRIBE_MAILTO_ENV)
        )
        self.bounce_address = bounce_address_template()  # VERP: the envelope sender names the delivery
        self._sets: dict[tuple[str, str | None], tuple[jinja2.Template, ...]] = {}
        self._senders: dict[str, tuple[str, str, str]] = {}
        self._globals: dict[
            int, tuple[jinja2.Template, dict[str, Any]]
        ] = {}  # id(template) -> (template, its globals)
        self._date: tuple[int, str] = (0, "")

    def template_set(self, name: str, locale: str | None = None) -> tuple[jinja2.Template, ...]:
        """The compiled (subject, txt, html) for ``name`` in ``locale`` (falls back to the plain set)."""
        key = (name, locale)
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = self._load_set(name, locale)
        return found

    def _load_set(self, name: str, locale: str | None) -> tuple[jinja2.Template, ...]:
        candidates = []
        match = _LOCALE.fullmatch(locale.strip()) if isinstance(locale, str) else None
        if match:  # only a well-formed locale reaches a file name
            language, region = match.group(1).lower(), match.group(2)
            if region:
                candidates.append(f"{name}.{language}_{region.upper()}")
            candidates.append(f"{name}.{language}")
        candidates.append(name)
        for prefix in candidates:
            if all((self.templates_dir / f"{prefix}.{part}.j2").is_file() for part in PARTS):
                try:
                    return tuple(self.environment.get_template(f"{prefix}.{part}.j2") for part in PARTS)
                except jinja2.TemplateError as error:
                    raise TemplateRenderError(f"template set {prefix!r}: {error}") from None
        raise TemplateRenderError(
            f"template set {name!r} not found in {self.templates_dir} (needs {name}.subject.j2, .txt.j2, .html.j2)"
        )

    def _render_template(self, template: jinja2.Template, context: dict[str, Any]) -> str:
        """``template.render(context)`` without its per-call copy of the globals' ChainMap (~70 µs)."""
        key = id(template)
        found = self._globals.get(key)
        if found is None:
            found = self._globals[key] = (template, dict(template.globals))
        environment = template.environment
        frame = environment.context_class(
            environment, {**found[1], **context}, template.name, template.blocks
        )
        return environment.concat(template.root_render_func(frame))  # type: ignore[attr-defined]

    def _sender(self, sender: str) -> tuple[str, str, str]:
        found = self._senders.get(sender)
        if found is None:
            header, address = parse_sender(sender)
            found = self._senders[sender] = (header, address, address.rpartition("@")[2])
        return found

    def _date_header(self) -> str:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, formatdate(second, usegmt=True))
        return self._date[1]

    def render_bytes(
        self,
        campaign: CampaignLike,
        recipient: Mapping[str, Any],
        event: Mapping[str, Any],
        delivery_id: str,
        unsubscribe_url: str,
        unsubscribe_token: str = "",
    ) -> RenderedEmail:
        """The message as SMTP bytes. InvalidEmailError for a bad recipient, TemplateRenderError else.
        The ``mailto:`` unsubscribe (when set) carries ``unsubscribe_token``, the link's signed
        token: without one it is left out (a delivery id alone must unsubscribe no one)."""
        to_address = normalize_email(recipient.get("email"))
        from_header, from_address, domain = self._sender(campaign.sender)
        if _URL_FORBIDDEN.search(unsubscribe_url):
            raise TemplateRenderError(
                f"unsubscribe URL {unsubscribe_url[:100]!r} contains spaces, quotes or brackets"
            )
        context = {
            "recipient": recipient,
            "event": event,
            "campaign": {"id": campaign.id},
            "unsubscribe_url": unsubscribe_url,
        }
        subject, text, html = self._render_set(campaign.template, recipient.get("locale"), context)
        name = " ".join(str(p) for p in (recipient.get("first_name"), recipient.get("last_name")) if p)
        message_id = message_id_for(delivery_id, domain)
        unsubscribe = f"<{unsubscribe_url}>"
        if self.unsubscribe_mailto and unsubscribe_token:
            by_mail = f"unsubscribe-{quote(unsubscribe_token, safe='')}"
            unsubscribe += f", <mailto:{self.unsubscribe_mailto}?subject={by_mail}>"
        headers = (
            f"From: {from_header}\r\n"
            f"To: {format_address(name, to_address)}\r\n"
            f"Subject: {encode_unstructured(subject)}\r\n"
            f"Date: {self._date_header()}\r\n"
            f"Message-ID: {message_id}\r\n"
            f"List-Unsubscribe: {unsubscribe}\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            f"X-Campaign-Id: {clean_header_text(campaign.id)}\r\n"
        )
        data = _multipart_alternative(headers, text, html, message_id)
        envelope_from = from_address
        if self.bounce_address:
            envelope_from = bounce_address_for(self.bounce_address, delivery_id)
        return RenderedEmail(envelope_from, to_address, data, message_id)

    def _render_set(self, template: str, locale: str | None, context: dict[str, Any]) -> tuple[str, str, str]:
        """The subject, text and HTML of the set ``template`` in ``locale``."""
        subject_t, text_t, html_t = self.template_set(template, locale)
        try:
            return (
                self._render_template(subject_t, context),
                self._render_template(text_t, context),
                self._render_template(html_t, context),
            )
        except Exception as error:  # any template failure fails this delivery only
            raise TemplateRenderError(
                f"template {template!r}: {type(error).__name__}: {error}"[:500]
            ) from None

    def render(
        self,
        campaign: CampaignLike,
        recipient: Mapping[str, Any],
        event: Mapping[str, Any],
        delivery_id: str,
        unsubscribe_url: str,
        unsubscribe_token: str = "",
    ) -> EmailMessage:
        """The message as an :class:`EmailMessage` (multipart/alternative text + HTML)."""
        rendered = self.render_bytes(
            campaign, recipient, event, delivery_id, unsubscribe_url, unsubscribe_token
        )
        message = message_from_bytes(rendered.data, policy=email_policy.default)
        assert isinstance(message, EmailMessage)
        return message
