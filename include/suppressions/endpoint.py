"""The unsubscribe endpoint's one handler, whatever serves it (the Airflow plugin's FastAPI app,
or ``python -m include.cli unsubscribe serve``).

* ``POST`` with the form field ``List-Unsubscribe=One-Click`` (``application/x-www-form-urlencoded``
  or ``multipart/form-data``, RFC 8058): records an ``unsubscribed`` suppression, answers 200;
  again: 200, nothing new. The confirmation page's button posts the same body.
* ``GET`` (and ``HEAD``): a small page with that button; changes nothing, since mail scanners
  follow links.
* A bad token: 400 (malformed, forged, altered) or 410 (expired, delivery purged), nothing
  recorded. A POST without the one-click field: 400, nothing recorded. Other methods: 405.

No sign-in: the signed token is the authority. Nothing of the address is shown on the pages.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from include.errors import TriggersError, UnsubscribeTokenError
from include.suppressions.unsubscribe import (
    ExpiredTokenError,
    check_token,
    record_unsubscribe,
    unsubscribe_secret,
)

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
ONE_CLICK_FIELD, ONE_CLICK_VALUE = "List-Unsubscribe", "One-Click"
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}
button{{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}}</style></head>
<body><h1>{title}</h1><p>{text}</p>{form}</body></html>
"""
_PRESS = "Press the button to stop receiving these emails at the address this one was sent to."
FORM = (
    '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<button type="submit">Unsubscribe</button></form>'
)


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    headers: dict[str, str] = field(
        default_factory=lambda: {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Robots-Tag": "noindex",
        }
    )


def page(status: int, title: str, text: str, form: bool = False) -> Answer:
    return Answer(
        status, PAGE.format(title=html.escape(title), text=html.escape(text), form=FORM if form else "")
    )


def is_one_click(body: bytes, content_type: str | None) -> bool:
    """Whether a POST body carries ``List-Unsubscribe=One-Click`` (urlencoded or multipart)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        try:
            message = BytesParser(policy=HTTP).parsebytes(head + body)
            for part in message.iter_parts() if message.is_multipart() else ():
                if part.get_param("name", header="content-disposition") == ONE_CLICK_FIELD:
                    value = part.get_payload(decode=True) or b""
                    if value.strip() == ONE_CLICK_VALUE.encode():
                        return True
        except Exception:  # noqa: BLE001 - a body the email parser cannot read is not a one-click request
            return False
        return False
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        return False
    return ONE_CLICK_VALUE in [value.strip() for value in fields.get(ONE_CLICK_FIELD, [])]


def answer(
    engine: Engine,
    method: str,
    token: str | bytes,
    body: bytes = b"",
    content_type: str | None = None,
    now: float | None = None,
) -> Answer:
    """The response to one request for ``token`` (any method, any body); never raises for what a
    client sends. A database that cannot be reached is a 503: the client (a mailbox provider)
    tries again later."""
    method = method.upper()
    if method not in ("GET", "HEAD", "POST"):
        return page(405, "Not allowed", "Open the unsubscribe link from the email.")
    if method == "POST" and len(body) > MAX_BODY_BYTES:
        return page(413, "Too large", "An unsubscribe request is one short form field.")
    try:
        secret = unsubscribe_secret(engine)
        with engine.begin() as conn:
            found = check_token(conn, secret, token, now)  # first: a bad token gets no button
            if method != "POST":
                return page(200, "Unsubscribe", _PRESS, form=True)
            if not is_one_click(body, content_type):
                return page(400, "Not unsubscribed", "Use the button on this page to unsubscribe.", form=True)
            record_unsubscribe(conn, found.delivery_id, now)
        return page(200, "Unsubscribed", "You will receive no more of these emails at this address.")
    except ExpiredTokenError as error:
        return page(410, "Link expired", str(error))
    except UnsubscribeTokenError as error:
        return page(400, "Link not valid", str(error))
    except (SQLAlchemyError, TriggersError) as error:  # ours to fix (database, secret): the client retries
        log.error(
            "unsubscribe endpoint unavailable: %s",
            type(error).__name__ if isinstance(error, SQLAlchemyError) else error,
        )
        return page(503, "Try again later", "The unsubscribe service is not available just now.")


def token_pattern(url_template: str) -> tuple[re.Pattern[str], str | None]:
    """For a ``TRIGGERS_UNSUBSCRIBE_URL``: the pattern its request paths match (group ``token``
    when the token is in the path) and the query field that holds the token (when it is there)."""
    parts = urlsplit(url_template)
    pieces = re.split(r"(\{[a-z_]+\})", parts.path or "/")
    pattern = "".join(
        "(?P<token>[^/]+)" if piece == "{token}" else "[^/]*" if piece.startswith("{") else re.escape(piece)
        for piece in pieces
        if piece
    )
    field_name = next((name for name, values in parse_qs(parts.query).items() if "{token}" in values), None)
    return re.compile(pattern), field_name


def token_from_request(url_template: str, path: str, query: str) -> str | None:
    """The token of a request to the endpoint at ``url_template``'s path, else None (not ours)."""
    pattern, field_name = token_pattern(url_template)
    match = pattern.fullmatch(path)
    if match is None:
        return None
    if "token" in match.groupdict():
        return unquote(match.group("token"))
    if field_name:
        return (parse_qs(query).get(field_name) or [""])[0]
    return None
