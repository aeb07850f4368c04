"""What counts as one email address: the check every layer shares (audience, suppressions,
bounces, delivery).

Only one plain ``local@domain`` is accepted (an IDN domain in its ``xn--`` form): quoted local
parts, comments, display names, lists, spaces and control characters are refused, since an
address that needs any of them is not worth the risk of a misparsed recipient.
"""

from __future__ import annotations

import re
from typing import Any

from include.errors import InvalidEmailError

ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
LOCAL_PART = re.compile(rf"[{ATEXT}]+(?:\.[{ATEXT}]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})"
)


def normalize_email(value: Any) -> str:
    """``value`` as one plain ``local@domain`` address (IDN domain in ``xn--`` form, lower-cased),
    else InvalidEmailError."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidEmailError("empty email address")
    address = value.strip()
    local, at, domain = address.rpartition("@")
    if not at or len(address) > 254 or len(local) > 64 or not LOCAL_PART.fullmatch(local):
        raise InvalidEmailError(f"not a single valid email address: {address[:80]!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidEmailError(f"not a valid domain: {domain[:80]!r}") from None
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise InvalidEmailError(f"not a single valid email address: {address[:80]!r}")
    return f"{local}@{domain.lower()}"
