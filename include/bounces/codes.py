"""Which permanent failures say that an address is bad (RFC 3463 enhanced status codes).

A hard bounce suppresses the address for every campaign; any other permanent failure fails
(or bounces) that one delivery only: a policy refusal (5.7.x), a full mailbox (5.2.2), a message
too big (5.3.4) or a routing problem (5.4.x) says nothing lasting about the address.
"""

from __future__ import annotations

import re

# 5.1.1 bad destination mailbox, 5.1.2 bad destination system (domain), 5.1.3 bad destination
# address syntax, 5.1.6 mailbox has moved, 5.1.10 null MX (RFC 7505), 5.2.1 mailbox disabled.
# Not 5.1.0 (unspecified), 5.1.4 (ambiguous), 5.1.5 (valid), 5.1.7/5.1.8 (about our sender).
HARD_BOUNCE_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_REPLY_CODE = re.compile(r"\s*([245])\d\d[\s-]")


def enhanced_status(text: str | None) -> str | None:
    """The first enhanced status code (``5.1.1``) in ``text``, leading zeros dropped; else None."""
    match = _ENHANCED.search(text or "")
    if match is None:
        return None
    cls, subject, detail = match.groups()
    return f"{cls}.{int(subject)}.{int(detail)}"


def is_hard_status(status: str | None) -> bool:
    """``status`` (``5.1.1``) says the address itself is bad."""
    return enhanced_status(status) in HARD_BOUNCE_STATUSES


def is_hard_bounce_reply(reply: str | None) -> bool:
    """An SMTP reply as recorded (``550 5.1.1 ...``): a 5xx whose enhanced code says the address is
    bad. A reply without an enhanced code is not one: the text alone is too loose to trust."""
    code = _REPLY_CODE.match(reply or "")
    return code is not None and code.group(1) == "5" and is_hard_status(reply[code.end() :])
