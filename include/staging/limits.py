"""What staging accepts of an event and what the databases can hold: storable text, nesting depth,
event times, and the end of a JSON value found without recursion (for pages that are not JSON).

Neither database stores NUL in text, and neither driver encodes a lone UTF-16 surrogate (an emoji
cut in half, ``"checkout\\ud83d"``): both become U+FFFD, in the columns and in the payload.
"""

from __future__ import annotations

import math
import re

MAX_DEPTH = 64  # nesting levels of an event; json's C scanner recurses on the C stack
EARLIEST_TIME = 946_684_800.0  # 2000-01-01T00:00:00Z
LATEST_AHEAD = 86_400.0  # an event time more than a day after it was received is absurd

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# an escaped backslash (kept, so that `\\u0000` stays text), a surrogate pair (kept), or the
# escape of NUL or of a lone surrogate (replaced)
_ESCAPE = re.compile(
    r"\\(?:\\|u(?:[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|0000|[dD][89a-fA-F][0-9a-fA-F]{2}))"
)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(r'"(?:[^"\\]|\\.)*"|[^,\]}\s]+', re.DOTALL)


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates (which neither database stores) as U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else text


def storable_json(text: str) -> str:
    """JSON text whose strings, once decoded, the databases can store: the escapes of NUL and of
    lone surrogates become ``\\ufffd``, and raw ones U+FFFD."""
    if "\\u" in text:
        text = _ESCAPE.sub(_keep_or_replace, text)
    return storable(text)


def _keep_or_replace(match: re.Match[str]) -> str:
    escape = match.group()
    return escape if len(escape) in (2, 12) else "\\ufffd"


def too_deep(text: str) -> bool:
    """Whether brackets (outside strings) nest deeper than MAX_DEPTH; the count of brackets bounds
    the depth, so only a text with many of them is walked."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for token in _TOKEN.finditer(text):
        bracket = text[token.start()]
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif bracket in "]}":
            depth -= 1
    return False


def value_end(text: str, index: int) -> int:
    """Where the JSON value starting at ``index`` ends, by its brackets outside strings (without
    recursion, whatever its depth); ValueError if it does not close. The value is not checked."""
    if text[index] not in "[{":
        scalar = _SCALAR.match(text, index)
        if scalar is None:
            raise ValueError(f"expected a value at {index}")
        return scalar.end()
    depth = 0
    for token in _TOKEN.finditer(text, index):
        bracket = text[token.start()]
        if bracket in "[{":
            depth += 1
        elif bracket in "]}":
            depth -= 1
            if depth == 0:
                return token.end()
    raise ValueError(f"the value at {index} does not close")


def time_problem(seconds: float, received_at: float) -> str | None:
    """Why an event time is refused (not finite, before 2000, more than a day ahead), or None."""
    if EARLIEST_TIME <= seconds <= received_at + LATEST_AHEAD:
        return None
    if not math.isfinite(seconds):
        return "its time is not finite"
    if seconds < EARLIEST_TIME:
        return "its time is before 2000-01-01"
    return "its time is more than a day after it was received"
