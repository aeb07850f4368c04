"""Reading what can be read of a page that is not valid UTF-8 or not valid JSON as a whole.

The page is decoded with ``surrogateescape`` (each bad byte kept, to be given back as it came)
and split into items by its brackets, without recursion. An item that does not split ends where
the next ``{"position":"...","event":`` begins (or at the list's end); it is returned whole, as raw bytes, and
staging quarantines it. Only a page without a readable ``{"events": [`` raises
UnreadablePageError.
"""

from __future__ import annotations

import json
import re
from typing import Any

from include.errors import UnreadablePageError
from include.staging.limits import MAX_DEPTH, storable, value_end

_WHITESPACE = re.compile(r"[ \t\n\r]*")
# the head of a journal item, {"position":"...","event": (a broken event holding this text is
# split there: both parts are quarantined, every byte kept)
_NEXT_ITEM = re.compile(
    r',[ \t\n\r]*(?=\{[ \t\n\r]*"position"[ \t\n\r]*:[ \t\n\r]*"(?:[^"\\]|\\.){0,1000}"[ \t\n\r]*,'
    r'[ \t\n\r]*"event"[ \t\n\r]*:)'
)
_ITEM_POSITION = re.compile(r'\{[ \t\n\r]*"position"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.){0,1000}")')
_PAGE_LAST = re.compile(
    r'"_page"[ \t\n\r]*:[ \t\n\r]*\{[^{}]*?"last"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.){0,1000}")'
)

Item = tuple[str | None, bytes]  # (position or None, the event's raw bytes)


def salvage_page(body: bytes) -> tuple[list[Item], str | None]:
    """The items that can be told apart, and ``_page.last`` if readable."""
    text = body.decode("utf-8", "surrogateescape")
    items: list[Item] | None = None
    last = None
    try:
        index = _expect(text, 0, "{")
        while text[index] != "}":
            key, index = _key(text, index)
            if key == "events":
                items, index = _split_items(text, index)
            else:
                end = value_end(text, index)
                if key == "_page":
                    last = _last_of(text[index:end])
                index = end
            index = _after_member(text, index, "}")
    except (ValueError, IndexError) as error:
        if items is None:
            raise UnreadablePageError(f"no readable 'events' list ({error}): {body[:200]!r}") from None
        # what follows the events is unreadable: the items' own positions stand
    if items is None:
        raise UnreadablePageError(f"no 'events' list: {body[:200]!r}")
    return items, last


def last_position_of(body: bytes) -> str | None:
    """``_page.last`` of a page, if it can be found in its bytes at all."""
    found = _PAGE_LAST.search(body.decode("utf-8", "replace"))
    return _string(found.group(1)) if found else None


def _split_items(text: str, index: int) -> tuple[list[Item], int]:
    items: list[Item] = []
    index = _expect(text, index, "[")
    while text[index] != "]":
        start = index
        try:
            end = value_end(text, start)
            position, raw = _item(text, start, end)
            index = _after_member(text, end, "]")
        except (ValueError, IndexError):
            end, index = _resync(text, start)
            found = _ITEM_POSITION.match(text, start)
            position, raw = (_string(found.group(1)) if found else None), text[start:end]
        items.append((position, raw.encode("utf-8", "surrogateescape")))
        if index >= len(text):
            break
    return items, index + 1


def _item(text: str, start: int, end: int) -> tuple[str | None, str]:
    """``(position, the event's raw text)`` of the journal item ``text[start:end]``; a value that
    is not an object is the event itself (staging quarantines it)."""
    if text[start] != "{":
        return None, text[start:end]
    position, raw = None, "null"  # an item without an event is a null one
    index = _skip(text, start + 1)
    while text[index] != "}":
        key, index = _key(text, index)
        value_until = value_end(text, index)
        if key == "position":
            position = _position(text[index:value_until])
        elif key == "event":
            raw = text[index:value_until]
        index = _after_member(text, value_until, "}")
    if index + 1 != end:
        raise ValueError(f"the item at {start} has more than one object")
    return position, raw


def _resync(text: str, start: int) -> tuple[int, int]:
    """Where a broken item ends and where the next item (or the list's end) begins."""
    found = _NEXT_ITEM.search(text, start + 1)
    if found:
        return found.start(), found.end()
    tail = text.rfind('"_page"')
    close = text.rfind("]", start, tail if tail > start else len(text))
    if close <= start:
        return len(text), len(text)
    return close, close


def _position(value_text: str) -> str:
    if value_text.count("[") + value_text.count("{") > MAX_DEPTH:
        raise ValueError("a position nested too deep")
    value = json.loads(value_text)
    return storable(value if isinstance(value, str) else str(value))


def _string(json_text: str) -> str | None:
    try:
        return storable(json.loads(json_text))
    except ValueError:
        return None


def _last_of(value_text: str) -> str | None:
    try:
        value: Any = (
            json.loads(value_text) if value_text.count("[") + value_text.count("{") <= MAX_DEPTH else None
        )
    except ValueError:
        return None
    last = value.get("last") if isinstance(value, dict) else None
    if last is None:
        return None
    return storable(last if isinstance(last, str) else str(last))


def _skip(text: str, index: int) -> int:
    if text[index] not in " \t\n\r":  # compact JSON: the common case, without a regex
        return index
    return _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]


def _expect(text: str, index: int, opening: str) -> int:
    index = _skip(text, index)
    if text[index] != opening:
        raise ValueError(f"expected {opening!r} at {index}")
    return _skip(text, index + 1)


def _key(text: str, index: int) -> tuple[str, int]:
    """The key at index and the start of its value."""
    if text[index] != '"':
        raise ValueError(f"expected a key at {index}")
    key, index = json.decoder.scanstring(text, index + 1)
    index = _skip(text, index)
    if text[index] != ":":
        raise ValueError(f"expected ':' at {index}")
    return key, _skip(text, index + 1)


def _after_member(text: str, index: int, closing: str) -> int:
    """Past the ',' after a member, or at the closing bracket."""
    index = _skip(text, index)
    if text[index] == ",":
        return _skip(text, index + 1)
    if text[index] != closing:
        raise ValueError(f"expected ',' or {closing!r} at {index}")
    return index
