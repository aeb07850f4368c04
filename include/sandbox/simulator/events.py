"""A local stand-in for Adobe IMS and the Analytics Triggers pipeline journal (SPEC sections 1-3).

One stdlib HTTP server on 127.0.0.1 answers both the IMS token endpoints and the journal, so the
connection's ``host`` and ``ims_url`` are the same base URL. The journal holds, per position, only
a generated-event number (8 bytes) or, for ``publish_raw``, the event's JSON text; a page of
generated events is rebuilt from ``(seed, numbers)`` on demand as one numpy byte matrix, so memory
stays flat and the server serves well over 100,000 events/s on one core.

Run it: ``python -m include.cli simulator serve --events 10000 --public-key var/keys/public.pem``.
Switch faults while it runs: ``curl -d '{"status": 503, "count": 3}' URL/_sim/faults``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
import unicodedata
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from include.errors import ConfigError

log = logging.getLogger(__name__)

CART_ABANDONMENT = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
BROWSE_ABANDONMENT = "5c2d8e71-4b0a-4f3e-9d6c-1a7b8e9f0c21"
PURCHASE = "9b1f6a52-0c1e-4d5e-8a0e-5f2d7c3b9e40"
TRIGGER_LABELS = {CART_ABANDONMENT: "cart_abandonment", BROWSE_ABANDONMENT: "browse_abandonment", PURCHASE: "purchase"}
# Trigger definitions the project's configuration does not know (other teams' triggers).
UNKNOWN_TRIGGERS = (
    "0d4e7c19-8a2b-4f6e-b1c3-7e9a5d2f8b64",
    "a71f3b2c-5e8d-4c09-9f6a-3b2e1d7c5a98",
    "e2c95a40-7b1d-4e3f-8c62-9d0a4f1b7e35",
)
MALFORMED_KINDS = ("not_object", "no_trigger_id", "bad_timestamp", "oversized")
CATALOGUE_SIZE = 2000  # SKU-1 .. SKU-2000
OVERSIZED_PRODUCTS = 2500  # about 27 kB of JSON, above the default max_msg_size of 20,000 bytes
JOURNAL_LIMIT_MAX = 100_000
HOT_SHARE = 0.10  # share of events fired by the hot 1 % of people (repeat visitors)

_MASK64 = (1 << 64) - 1


@dataclass
class SimulatorOptions:
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    org_id: str = "ABCDEF0123456789ABCDEF01@AdobeOrg"
    technical_account_id: str = "sim@techacct.adobe.com"
    public_key_pem: bytes | None = None  # JWT signatures are verified against it (RS256)
    consumer: str = "customer_dev"  # the consumer the credentials are entitled to
    token_lifetime: float = 86400.0  # seconds; the JWT exchange reports expires_in in ms, OAuth in s
    events: int = 0  # events published at start
    rate: float = 0.0  # events/s published continuously after start
    people: int = 10_000  # population size (repeat visitors)
    malformed_share: float = 0.0
    duplicate_share: float = 0.0  # share of positions that re-publish an earlier event (same ids)
    unknown_trigger_share: float = 0.05  # events of a triggerId no configuration knows
    bare_share: float = 0.0  # share in the bare trigger form of SPEC section 3
    retention: int | None = None  # keep only the newest N events; an older `since` -> 410
    start_time: float | None = None  # unix s of the first event; default now - time_span
    time_span: float = 7200.0  # the start events' trigger times spread over this many seconds
    seed: int = 1
    idle_retry_after: float = 1.0  # Retry-After of a 204 (journal drained)


# --------------------------------------------------------------------------- vectorised helpers


def _share(value: float, bits: int) -> int:
    """A probability as a threshold on a ``bits``-bit random integer."""
    return int(round(min(max(value, 0.0), 1.0) * (1 << bits)))


@cache
def _u64(value: int) -> np.uint64:
    """A cached numpy uint64 constant (building one costs more than the operation it feeds)."""
    return np.uint64(value & _MASK64)


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: well-spread 64-bit words from consecutive integers (vectorised)."""
    z = values.astype(np.uint64) + _u64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _u64(27))) * _u64(0x94D049BB133111EB)
    return z ^ (z >> _u64(31))


def _bits(words: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``width`` bits starting at bit ``shift`` of random words viewed as int64 (the mask drops
    the sign bits an arithmetic shift brings in)."""
    return (words >> shift) & ((1 << width) - 1)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_chars(words: np.ndarray) -> np.ndarray:
    """(n, k) uint64 -> (n, 16k) ASCII hex digits, big-endian, as uint8."""
    octets = np.ascontiguousarray(words.astype(">u8")).view(np.uint8).reshape(len(words), -1)
    nibbles = np.empty((len(words), octets.shape[1] * 2), dtype=np.uint8)
    nibbles[:, 0::2] = octets >> 4
    nibbles[:, 1::2] = octets & 15
    return _HEX_DIGITS[nibbles]


def _uuid_chars(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """(n, 36) ASCII version-4 UUIDs from two uint64 columns."""
    words = np.stack([(high & _u64(0xFFFFFFFFFFFF0FFF)) | _u64(0x4000),
                      (low & _u64(0x3FFFFFFFFFFFFFFF)) | _u64(0x8000000000000000)], axis=1)
    hexes = _hex_chars(words)
    out = np.full((len(words), 36), ord("-"), dtype=np.uint8)
    for begin, end, dashes in ((0, 8, 0), (8, 12, 1), (12, 16, 2), (16, 20, 3), (20, 32, 4)):
        out[:, begin + dashes : end + dashes] = hexes[:, begin:end]
    return out


def _decimal_chars(values: np.ndarray, width: int) -> np.ndarray:
    """values (any shape, 0 <= v < 10**width) -> shape + (width,) zero-padded ASCII digits."""
    remaining = values.astype(np.uint64)
    quads = -(-width // 4)
    out = np.empty(values.shape + (quads,), dtype=np.uint32)  # four ASCII digits per uint32
    ten_thousand = _u64(10_000)
    for quad in range(quads - 1, -1, -1):  # uint64 // is numpy's fast integer division
        quotient = remaining // ten_thousand
        out[..., quad] = _QUADS[(remaining - quotient * ten_thousand).astype(np.intp)]
        remaining = quotient
    return out.view(np.uint8)[..., 4 * quads - width :]


_QUADS = np.frombuffer("".join(f"{n:04d}" for n in range(10_000)).encode(), dtype=np.uint32)


def _space_padded(chars: np.ndarray) -> np.ndarray:
    """Zero-padded digits -> right-aligned with leading spaces (JSON allows them before a value)."""
    leading = np.cumprod(chars[..., :-1] == ord("0"), axis=-1).astype(bool)
    chars[..., :-1][leading] = ord(" ")
    return chars


def _rows_text(chars: np.ndarray) -> list[str]:
    """Rows of an (n, width) ASCII array as n strings."""
    width = chars.shape[1]
    text = np.ascontiguousarray(chars).tobytes().decode("ascii")
    return [text[i : i + width] for i in range(0, len(text), width)]


# --------------------------------------------------------------------------- population


def _identity_chars(people: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 9) shopper-id digits and (n, 38) mcId digits of persons ``people`` (seed independent)."""
    people = np.asarray(people, dtype=np.int64)
    salt = _u64(0x5EED_1D3E_7717_0000)
    first = _mix(people.astype(np.uint64) * _u64(2) + salt)
    second = _mix(people.astype(np.uint64) * _u64(2) + salt + _u64(1))
    high = (_u64(1) + first % _u64(9)) * _u64(10**18) + (first >> _u64(4)) % _u64(10**18)  # no leading zero
    low = second % _u64(10**19)
    mc_chars = _decimal_chars(np.stack([high, low], axis=1), 19).reshape(len(people), 38)
    return _decimal_chars(people, 9), mc_chars


def person_identity(i: int) -> tuple[str, str]:
    """Person ``i``'s shopper id (the eVar01 value) and 38-digit mcId; the same for every seed."""
    shopper, mc_id = _identity_chars(np.array([i]))
    return "SHOP-" + shopper.tobytes().decode(), mc_id.tobytes().decode()


_FIRST_NAMES = {
    "fr_FR": ("Camille", "Léa", "Hugo", "Zoé", "Théo", "Chloé", "Mathis", "Inès", "Louis", "Anaïs"),
    "de_DE": ("Jürgen", "Lena", "Maximilian", "Sophie", "Lukas", "Mia", "Jonas", "Hanna", "Felix", "Jörg"),
    "en_US": ("Emma", "Liam", "Olivia", "Noah", "Ava", "James", "Sophia", "Mason", "Isabella", "Ethan"),
}
_LAST_NAMES = {
    "fr_FR": ("Martin", "Bernard", "Dubois", "Lefèvre", "Moreau", "Girard", "Faure", "Rousseau"),
    "de_DE": ("Müller", "Schmidt", "Schneider", "Fischer", "Weiß", "Becker", "Schäfer", "Koch"),
    "en_US": ("Smith", "Johnson", "O'Brien", "Williams", "Brown", "Garcia", "Miller", "Davis"),
}
_LOCALES = (("en_US", 0.45), ("fr_FR", 0.25), ("de_DE", 0.15), ("", 0.15))
# reserved names (RFC 2606/6761), several of them so that per-domain send limits show as they would
_MAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example", "inbox.example")
_INVALID_EMAILS = ("not-an-email", "{first}@", "{first}@@example.com", "{first} {last}@example.com", "@example.com")
AUDIENCE_COLUMNS = ("recipient_id", "email", "first_name", "last_name", "locale", "shopper_id", "mc_id", "opted_out")


def _ascii_local_part(name: str) -> str:
    """"Weiß" -> "weiss", "Zoé" -> "zoe", "O'Brien" -> "obrien": a plain ASCII address part."""
    folded = unicodedata.normalize("NFKD", name.lower().replace("ß", "ss"))
    return "".join(c for c in folded if c.isascii() and c.isalnum())


def write_audience_csv(
    path: str | os.PathLike[str],
    people: int,
    seed: int = 1,
    opted_out_share: float = 0.02,
    invalid_email_share: float = 0.01,
) -> Path:
    """Write the recipients CSV of SPEC section 5 for persons ``0..people-1`` of the simulator.

    Recipient ``R{i:09d}`` is person ``i``: its shopper_id and mc_id are those of the events.
    A few e-mail addresses are invalid and a few people opted out, as in a real audience.
    """
    rng = random.Random(seed)
    locales = [name for name, _ in _LOCALES]
    weights = [share for _, share in _LOCALES]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 100_000
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(AUDIENCE_COLUMNS)
        for begin in range(0, people, chunk):
            indexes = np.arange(begin, min(people, begin + chunk))
            shoppers, mc_ids = _identity_chars(indexes)
            shopper_texts, mc_texts = _rows_text(shoppers), _rows_text(mc_ids)
            rows = []
            for i, shopper, mc_id in zip(indexes.tolist(), shopper_texts, mc_texts, strict=True):
                locale = rng.choices(locales, weights)[0]
                first = rng.choice(_FIRST_NAMES[locale or "en_US"])
                last = rng.choice(_LAST_NAMES[locale or "en_US"])
                if rng.random() < invalid_email_share:
                    email = rng.choice(_INVALID_EMAILS).format(first=first.lower(), last=last.lower())
                else:
                    domain = _MAIL_DOMAINS[i % len(_MAIL_DOMAINS)]
                    email = f"{_ascii_local_part(first)}.{_ascii_local_part(last)}.{i}@{domain}"
                if rng.random() < 0.03:  # first names are nullable; templates must cope
                    first = ""
                opted_out = "true" if rng.random() < opted_out_share else "false"
                rows.append((f"R{i:09d}", email, first, last, locale, "SHOP-" + shopper, mc_id, opted_out))
            writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- events

_TRIGGER_IDS = (CART_ABANDONMENT, BROWSE_ABANDONMENT, PURCHASE, *UNKNOWN_TRIGGERS)
_BROWSE_PAGES = ("home", "search:results", "category:shoes", "category:bags", "category:outdoor", "category:sale")
# page codes: 0 none, 1..CATALOGUE_SIZE a product page, then the browse pages, then the final pages
_PAGE_BROWSE = CATALOGUE_SIZE + 1
_PAGE_CART, _PAGE_SHIPPING, _PAGE_CONFIRMATION = (_PAGE_BROWSE + len(_BROWSE_PAGES) + k for k in range(3))
_PAGE_NAMES = ("", *(f"product:SKU-{n}" for n in range(1, CATALOGUE_SIZE + 1)), *_BROWSE_PAGES,
               "checkout:cart", "checkout:shipping", "checkout:confirmation")
_SKU_NAMES = ("", *(f"SKU-{n}" for n in range(1, CATALOGUE_SIZE + 1)))
_SKU_CELL, _PAGE_CELL, _TIME_CELL = 11, 23, 11  # widths of one array element with its comma and padding
_SPACE = ord(" ")


def _cells(names: tuple[str, ...], width: int, separator: str) -> np.ndarray:
    """ASCII table: row k = ``separator"names[k]"`` left-aligned in ``width`` (row of "" = blank)."""
    text = "".join((f'{separator}"{name}"' if name else "").ljust(width) for name in names)
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).reshape(len(names), width)


_SKU_FIRST, _SKU_NEXT = _cells(_SKU_NAMES, _SKU_CELL, ""), _cells(_SKU_NAMES, _SKU_CELL, ",")
_PAGE_CELLS = _cells(_PAGE_NAMES, _PAGE_CELL, "")
_TRIGGER_ID_CHARS = np.frombuffer("".join(_TRIGGER_IDS).encode(), dtype=np.uint8).reshape(len(_TRIGGER_IDS), 36)
_OVERSIZED_SKUS = ",".join(f'"SKU-{1 + k * 7 % CATALOGUE_SIZE}"' for k in range(OVERSIZED_PRODUCTS)).encode()
_DIMENSIONS_OPEN = ',"enrichments":{"analyticsHitSummary":{"dimensions":{'
_TAIL_CORE = '],"name":"timeGMT","source":"session summary"}},"products":{}}}'


def _ascii(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8)


class _Template:
    """A fixed-width ASCII row: constant text with named slots (width) and named marks (offsets)."""

    def __init__(self, parts: list[str | tuple[str, int] | tuple[str]], width: int | None = None):
        text = ""
        self.slots: dict[str, slice] = {}
        self.marks: dict[str, int] = {}
        for part in parts:
            if isinstance(part, str):
                text += part
            elif len(part) == 1:
                self.marks[part[0]] = len(text)
            else:
                name, size = part
                self.slots[name] = slice(len(text), len(text) + size)
                text += " " * size
        self.width = width if width is not None else len(text)
        if len(text) > self.width:
            raise ValueError(f"template is {len(text)} characters, wider than {self.width}")
        self.row = _ascii(text.ljust(self.width))

    def span(self, start: str, end: str) -> slice:
        return slice(self.marks[start], self.marks[end])

    def matrix(self, rows: int) -> np.ndarray:
        return np.tile(self.row, (rows, 1))


class EventFactory:
    """Renders generated events as JSON, deterministically from (seed, event number ``g``).

    A page is one numpy byte matrix, a journal item per row: numpy draws eight random 64-bit
    words per event and fills fixed-width slots (UUIDs, 13-digit milliseconds, the 38-digit
    mcId, SKU and page names looked up in pre-rendered tables). Values of variable length are
    padded with spaces where JSON allows white space, so the parsed events are exact while no
    Python code runs per event; only the rare oversized message is spliced in separately.
    """

    WORDS = 8

    def __init__(self, options: SimulatorOptions):
        self.people = max(1, options.people)
        self.hot_people = max(1, self.people // 100)
        self._key = _u64(int.from_bytes(hashlib.blake2b(b"events:%d" % options.seed, digest_size=8).digest(), "little"))
        self._malformed = _share(options.malformed_share, 20)
        self._unknown = _share(options.unknown_trigger_share, 16)
        self._bare = _share(options.bare_share, 16)
        self._hot = _share(HOT_SHARE, 8)
        self.item = _Template([
            ',{"position":"', ("position", 16), '","event":', ("bracket", 1), ("body",), ("head",),
            '{"event_id":"', ("event_id", 36),
            '","event":{"envelopeType":"DATA","topic":"triggers","partition":', ("partition", 2),
            ',"offset":', ("offset", 10), ',"createTime":', ("create_ms", 13),
            ',"com.adobe.mcloud.pipeline.pipelineMessage":{"header":{"messageType":"TRIGGER",'
            '"source":"triggers","sentTime":', ("sent_ms", 13),
            f',"imsOrg":{json.dumps(options.org_id)},"messageId":"', ("message_id", 36),
            '"},"com.adobe.mcloud.protocol.trigger":{',
            ("trigger_id_pair",), '"triggerId":"', ("trigger_id", 36), '",', ("trigger_id_pair_end",),
            '"triggerTimestamp":', ("trigger_ms", 13), ',"mcId":"', ("mc_id", 38), '"', _DIMENSIONS_OPEN,
            ("head_end",),
            ("evar",), ' "eVar01":{"type":"string","data":["SHOP-', ("shopper", 9),
            '"],"name":"eVar01","source":"session summary"},', ("evar_end",),
            ("products",), '"products":{"type":"string","data":[', ("skus", 4 * _SKU_CELL),
            '],"name":"products","source":"session summary"},', ("products_end",),
            ("pages",), '"pageName":{"type":"string","data":[', ("page", _PAGE_CELL),
            '],"name":"pageName","source":"session summary"},', ("pages_end",),
            '"timeGMT":{"type":"int","data":[', ("times", 6 * _TIME_CELL), _TAIL_CORE,
            ("tail", 4), ("body_end",), "}",
        ])
        item = self.item
        head_width = item.marks["head_end"] - item.marks["head"]
        self.bare_head = _Template([
            '{"triggerId":"', ("trigger_id", 36), '","timeGMT":', ("time_s", 10), ',"mcId":"', ("mc_id", 38),
            '"', _DIMENSIONS_OPEN,
        ], head_width)
        body_width = item.marks["body_end"] - item.marks["body"]
        self.string_body = _Template([
            '"TRIGGER ', ("trigger_id", 36), " ", ("mc_id", 38), " ", ("trigger_ms", 13), ' truncated by the sender"',
        ], body_width)

    # ---- random draws
    def _words(self, numbers: np.ndarray) -> np.ndarray:
        """(n, WORDS) random 64-bit words of events ``numbers``, viewed as int64."""
        base = np.asarray(numbers).astype(np.uint64) * _u64(self.WORDS) + self._key
        return _mix(base[:, None] + np.arange(self.WORDS, dtype=np.uint64)[None, :]).view(np.int64)

    def _kinds(self, w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(malformed kind index or -1, trigger index: 0 cart, 1 browse, 2 purchase, 3+ unknown)."""
        malformed = np.where(_bits(w0, 0, 20) < self._malformed, _bits(w0, 20, 2), -1)
        unknown_pick = _bits(w0, 22, 16)
        pick = _bits(w0, 38, 8)  # 55 % cart, 30 % browse, 15 % purchase
        trigger = np.where(pick < 141, 0, np.where(pick < 218, 1, 2))
        trigger = np.where(unknown_pick < self._unknown, 3 + unknown_pick % len(UNKNOWN_TRIGGERS), trigger)
        return malformed, np.where(malformed >= 0, 0, trigger)

    def _people(self, w1: np.ndarray) -> np.ndarray:
        who = _bits(w1, 8, 32)
        hot = _bits(w1, 0, 8) < self._hot  # repeat visitors: the hot 1 % fire 10 % of the events
        return np.where(hot, (who % self.hot_people) * 97 % self.people, who % self.people)

    def kind_of(self, g: int) -> tuple[str | None, str]:
        """(malformed kind or None, triggerId) of generated event ``g`` (for tests and reports)."""
        malformed, trigger = self._kinds(self._words(np.array([g]))[:, 0])
        return (MALFORMED_KINDS[malformed[0]] if malformed[0] >= 0 else None), _TRIGGER_IDS[trigger[0]]

    def _follow_carts(self, numbers: np.ndarray, steps: np.ndarray, trigger: np.ndarray, w1: np.ndarray,
                      w2: np.ndarray, people: np.ndarray) -> None:
        """Three quarters of purchases follow a cart abandonment by the same shopper a few minutes
        earlier in the journal, with the same products: look back up to three times for one."""
        follows = np.flatnonzero((trigger == 2) & (_bits(w1, 51, 2) != 0))
        if not len(follows):
            return
        gap = 90.0 + _bits(w1[follows], 53, 10)  # 1.5 to 18.5 minutes
        step = steps[follows]
        found = np.zeros(len(follows), dtype=bool)
        for attempt in range(3):
            back = np.where(step > 0, (gap + 120 * attempt) / np.where(step > 0, step, 1), 1 + 7 * attempt + gap % 50)
            earlier = numbers[follows] - np.clip(back, 1, 1 << 40).astype(np.int64)
            earlier_words = self._words(np.maximum(earlier, 0))
            earlier_malformed, earlier_trigger = self._kinds(earlier_words[:, 0])
            hit = ~found & (earlier >= 0) & (earlier_malformed < 0) & (earlier_trigger == 0)
            people[follows[hit]] = self._people(earlier_words[hit, 1])
            w2[follows[hit]] = earlier_words[hit, 2]
            found |= hit

    # ---- rendering
    def rows(self, numbers: np.ndarray, whens: np.ndarray, steps: np.ndarray,
             positions: np.ndarray) -> tuple[np.ndarray, dict[int, bytes]]:
        """The journal items of events ``numbers`` as an (n, width) ASCII matrix, one per row,
        each starting with a comma; plus the rows that do not fit it (oversized), as bytes.

        ``whens``: trigger times (unix s); ``steps``: the publishing interval near each event;
        ``positions``: (n, 16) ASCII of the items' positions.
        """
        numbers = np.asarray(numbers, dtype=np.int64)
        n = len(numbers)
        rows_index = np.arange(n)
        words = self._words(numbers)
        w0, w1, w2, w3 = words[:, 0], words[:, 1], words[:, 2].copy(), words[:, 3]
        malformed, trigger = self._kinds(w0)
        people = self._people(w1)
        self._follow_carts(numbers, steps, trigger, w1, w2, people)

        item = self.item
        slots = item.slots
        matrix = item.matrix(n)
        trigger_ms = (whens * 1000).astype(np.int64)
        sent_ms = trigger_ms + _bits(w2, 50, 4)
        create_ms = sent_ms + 5 + _bits(w2, 54, 5)
        millis = _decimal_chars(np.stack([trigger_ms, sent_ms, create_ms], axis=1), 13)
        shoppers, mc_ids = _identity_chars(people)
        trigger_ids = _TRIGGER_ID_CHARS[trigger]
        matrix[:, slots["position"]] = positions
        unsigned = words.view(np.uint64)
        matrix[:, slots["event_id"]] = _uuid_chars(unsigned[:, 6], unsigned[:, 7])
        matrix[:, slots["partition"]] = _space_padded(_decimal_chars(_bits(w2, 46, 4), 2))
        matrix[:, slots["offset"]] = _space_padded(_decimal_chars(500_000_000 + numbers, 10))
        matrix[:, slots["create_ms"]] = millis[:, 2]
        matrix[:, slots["sent_ms"]] = millis[:, 1]
        matrix[:, slots["message_id"]] = _uuid_chars(unsigned[:, 4], unsigned[:, 5])
        matrix[:, slots["trigger_id"]] = trigger_ids
        matrix[:, slots["trigger_ms"]] = millis[:, 0]
        matrix[:, slots["mc_id"]] = mc_ids
        matrix[:, slots["shopper"]] = shoppers

        # products: 1-4 SKUs from the catalogue
        sku_count = 1 + _bits(w2, 0, 2)
        skus = np.stack([1 + _bits(w2, 2 + 11 * k, 11) % CATALOGUE_SIZE for k in range(4)], axis=1)
        skus[np.arange(4)[None, :] >= sku_count[:, None]] = 0
        matrix[:, slots["skus"]] = np.concatenate([_SKU_FIRST[skus[:, 0]], _SKU_NEXT[skus[:, 1:]].reshape(n, -1)], axis=1)

        # pageName: the page the trigger fired on (one value, as in Adobe's sample)
        hits = 2 + _bits(w1, 40, 3) % 5
        page = np.select(
            [trigger == 0, trigger == 1, trigger == 2],
            [np.where(_bits(w3, 61, 3) < 2, _PAGE_SHIPPING, _PAGE_CART), skus[:, 0], _PAGE_CONFIRMATION],
            _PAGE_BROWSE + _bits(w3, 0, 8) % len(_BROWSE_PAGES),
        )
        matrix[:, slots["page"]] = _PAGE_CELLS[page]
        hit_index = np.arange(6)[None, :]

        # hit times: the last some minutes before the trigger fired, the earlier ones 15-142 s apart;
        # six cells, of which an event shows its last `hits`
        last_hit = np.floor(whens).astype(np.int64) - 60 - _bits(w3, 16, 10)
        gaps = np.stack([15 + _bits(w3, 26 + 7 * k, 7) for k in range(5)], axis=1)
        ascending = np.concatenate([last_hit[:, None] - np.cumsum(gaps, axis=1)[:, ::-1], last_hit[:, None]], axis=1)
        cells = np.full((n, 6, _TIME_CELL), ord(","), dtype=np.uint8)
        cells[:, :, 1:] = _decimal_chars(ascending, 10)
        first_shown = 6 - hits
        cells[hit_index < first_shown[:, None]] = _SPACE
        cells[rows_index, first_shown, 0] = _SPACE
        matrix[:, slots["times"]] = cells.reshape(n, -1)

        # the tail closes trigger, pipelineMessage, event and envelope
        matrix[:, slots["tail"]] = _ascii("}}}}")
        self._shape_rare(matrix, w0, w1, malformed, trigger_ids, millis[:, 0], mc_ids, whens)
        oversized = np.flatnonzero(malformed == 3)
        special = {}
        products = slots["skus"]
        for row in oversized.tolist():
            text = matrix[row].tobytes()
            special[row] = text[: products.start] + _OVERSIZED_SKUS + text[products.stop :]
        return matrix, special

    def _shape_rare(self, matrix: np.ndarray, w0: np.ndarray, w1: np.ndarray, malformed: np.ndarray,
                    trigger_ids: np.ndarray, trigger_ms: np.ndarray, mc_ids: np.ndarray, whens: np.ndarray) -> None:
        """Quirky dimensions, the bare form and the malformed kinds, each a masked rewrite of rows."""
        item = self.item
        slots, span = item.slots, item.span
        quirk = np.where(malformed == 3, 255, _bits(w1, 43, 8))  # an oversized message keeps its products
        blank = np.uint8(_SPACE)
        evar = item.marks["evar"]
        matrix[quirk < 5, evar : evar + 10] = _ascii('" eVar01":')  # stray white space, as in Adobe's sample
        matrix[quirk == 7, slots["skus"]] = blank  # a dimension whose data is empty
        matrix[quirk == 8, span("evar", "evar_end")] = blank  # missing dimensions
        matrix[quirk == 9, span("products", "products_end")] = blank
        matrix[quirk == 10, span("pages", "pages_end")] = blank

        matrix[malformed == 1, span("trigger_id_pair", "trigger_id_pair_end")] = blank
        matrix[malformed == 2, slots["trigger_ms"]] = _ascii('"yesterday"  ')
        bare = (_bits(w0, 46, 16) < self._bare) & (malformed < 0)
        as_list = (malformed == 0) & (_bits(w0, 62, 1) == 0)
        as_string = (malformed == 0) & (_bits(w0, 62, 1) == 1)
        bare_rows = np.flatnonzero(bare | as_list)
        if len(bare_rows):
            head = self.bare_head.matrix(len(bare_rows))
            head[:, self.bare_head.slots["trigger_id"]] = trigger_ids[bare_rows]
            head[:, self.bare_head.slots["time_s"]] = _decimal_chars(np.floor(whens[bare_rows]).astype(np.int64), 10)
            head[:, self.bare_head.slots["mc_id"]] = mc_ids[bare_rows]
            matrix[bare_rows, span("head", "head_end")] = head
            matrix[bare_rows, slots["tail"]] = _ascii("}   ")
        matrix[as_list, slots["bracket"]] = _ascii("[")
        matrix[as_list, slots["tail"]] = _ascii("}]  ")
        string_rows = np.flatnonzero(as_string)
        if len(string_rows):
            body = self.string_body.matrix(len(string_rows))
            body[:, self.string_body.slots["trigger_id"]] = trigger_ids[string_rows]
            body[:, self.string_body.slots["mc_id"]] = mc_ids[string_rows]
            body[:, self.string_body.slots["trigger_ms"]] = trigger_ms[string_rows]
            matrix[string_rows, slots["bracket"]] = blank
            matrix[string_rows, span("body", "body_end")] = body

    def render_events(self, numbers: np.ndarray, whens: np.ndarray, steps: np.ndarray) -> list[str]:
        """Each event's JSON text alone (tests, tools); the server uses ``rows``."""
        positions = np.full((len(numbers), 16), ord("0"), dtype=np.uint8)
        matrix, special = self.rows(numbers, whens, steps, positions)
        start = self.item.slots["bracket"].start
        texts = [special.get(row, matrix[row].tobytes()) for row in range(len(numbers))]
        return [text[start:-1].decode("ascii").strip() for text in texts]


def page_chunks(matrix: np.ndarray, special: dict[int, bytes]) -> list[bytes | memoryview]:
    """The comma-separated journal items of a page, as buffers to send in order without copying:
    runs of matrix rows, with the ``special`` rows swapped in; the first row's comma is blanked."""
    if len(matrix):
        matrix[0, 0] = _SPACE
    special = {row: (b" " + text[1:] if row == 0 else text) for row, text in special.items()}
    chunks: list[bytes | memoryview] = []
    previous = 0
    for row in sorted(special):
        if row > previous:
            chunks.append(memoryview(matrix[previous:row]).cast("B"))
        chunks.append(special[row])
        previous = row + 1
    if previous < len(matrix):
        chunks.append(memoryview(matrix[previous:]).cast("B"))
    return chunks


# --------------------------------------------------------------------------- journal


class PositionCodec:
    """Opaque journal positions: an affine bijection of the index on 64 bits, as 16 hex digits.

    Consecutive positions look unrelated, so a client cannot do arithmetic on them; a garbled one
    decodes to an index outside the journal. The key derives from seed and consumer, so a restarted
    simulator with the same settings still knows the positions it handed out.
    """

    def __init__(self, seed: int, consumer: str):
        digest = hashlib.blake2b(f"positions:{seed}:{consumer}".encode(), digest_size=16).digest()
        self._mul = int.from_bytes(digest[:8], "little") | 1
        self._add = int.from_bytes(digest[8:], "little")
        self._inverse = pow(self._mul, -1, 1 << 64)

    def encode(self, index: int) -> str:
        return f"{(index * self._mul + self._add) & _MASK64:016x}"

    def encode_chars(self, start: int, end: int) -> np.ndarray:
        """encode() of every index in start..end-1 as an (n, 16) ASCII array."""
        indexes = np.arange(start, end, dtype=np.uint64)
        return _hex_chars((indexes * _u64(self._mul) + _u64(self._add))[:, None])

    def decode(self, position: str) -> int | None:
        if len(position) != 16:
            return None
        try:
            value = int(position, 16)
        except ValueError:
            return None
        return ((value - self._add) * self._inverse) & _MASK64


class Journal:
    """The ordered events of one consumer. Thread-safe; memory: 8 bytes per generated position."""

    RAW = -1  # slot marker: the event's JSON text is in ``_raw`` under its position

    def __init__(self, options: SimulatorOptions):
        self.factory = EventFactory(options)
        self.codec = PositionCodec(options.seed, options.consumer)
        self.retention = options.retention
        self._duplicate_share = options.duplicate_share
        self._rng = np.random.default_rng([options.seed, 7919])
        self._lock = threading.Lock()
        self._slots = array("q")
        self._trimmed = 0  # positions dropped from the front of _slots (past retention)
        self._raw: dict[int, str] = {}
        self._raw_order: deque[int] = deque()
        self._next_generated = 0
        # (first generated number, its trigger time, seconds between consecutive numbers)
        self._segments: list[tuple[int, float, float]] = []
        self._segment_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def length(self) -> int:
        return self._trimmed + len(self._slots)

    @property
    def first_retained(self) -> int:
        if self.retention is None:
            return self._trimmed
        return max(self._trimmed, self.length - self.retention)

    def publish(self, count: int, first_time: float, step: float) -> None:
        """Append ``count`` positions of generated events fired from ``first_time`` every ``step`` s.

        With ``duplicate_share``, that share of the positions re-publishes one of the 2,000 events
        before it instead (same event_id and messageId), as a replaying pipeline does.
        """
        if count <= 0:
            return
        with self._lock:
            g = self._next_generated
            self._add_segment(g, first_time, step)
            numbers = np.arange(g, g + count, dtype=np.int64)
            if self._duplicate_share > 0:
                duplicate = self._rng.random(count) < self._duplicate_share
                duplicate[0] &= g > 0  # nothing to repeat yet
                fresh = ~duplicate
                published_before = g + np.cumsum(fresh) - fresh  # events that exist before each position
                numbers = published_before.copy()
                back = (self._rng.random(count) * np.minimum(published_before, 2000)).astype(np.int64)
                numbers[duplicate] = (published_before - 1 - back)[duplicate]
                g += int(fresh.sum())
            else:
                g += count
            self._slots.frombytes(numbers.astype(np.int64).tobytes())
            self._next_generated = g
            self._trim()

    def publish_raw(self, texts: list[str]) -> None:
        with self._lock:
            for text in texts:
                position = self.length
                self._slots.append(self.RAW)
                self._raw[position] = text
                self._raw_order.append(position)
            self._trim()

    def _add_segment(self, g: int, first_time: float, step: float) -> None:
        if self._segments:
            start, t0, previous_step = self._segments[-1]
            if previous_step == step and abs(t0 + (g - start) * step - first_time) < 1e-6:
                return  # continues the previous line (the steady rate publisher)
        self._segments.append((g, first_time, step))
        self._segment_arrays = None

    def _trim(self) -> None:
        first = self.first_retained
        while self._raw_order and self._raw_order[0] < first:
            del self._raw[self._raw_order.popleft()]
        drop = first - self._trimmed
        if drop > 4096 and drop * 2 > len(self._slots):
            del self._slots[:drop]
            self._trimmed += drop

    def page(self, start: int, end: int) -> tuple[list[bytes | memoryview], str] | None:
        """(the journal items of indexes start..end-1 as JSON list content in chunks, the last position);
        None if they were purged meanwhile (retention)."""
        with self._lock:
            if start < self.first_retained:
                return None
            slots = np.frombuffer(self._slots[start - self._trimmed : end - self._trimmed], dtype=np.int64)
            raw = {start + row: self._raw[start + row] for row in np.flatnonzero(slots == self.RAW).tolist()}
            if self._segment_arrays is None:
                self._segment_arrays = (
                    np.array([g for g, _, _ in self._segments], dtype=np.int64),
                    np.array([t0 for _, t0, _ in self._segments], dtype=np.float64),
                    np.array([step for _, _, step in self._segments], dtype=np.float64),
                )
            segment_starts, segment_t0, segment_steps = self._segment_arrays
        positions = self.codec.encode_chars(start, end)
        numbers = np.where(slots == self.RAW, 0, slots)
        segment = np.maximum(np.searchsorted(segment_starts, numbers, side="right") - 1, 0)
        if len(segment_starts):
            steps = segment_steps[segment]
            whens = segment_t0[segment] + (numbers - segment_starts[segment]) * steps
        else:  # only raw events so far
            steps = whens = np.full(len(numbers), time.time())
        matrix, special = self.factory.rows(numbers, whens, steps, positions)
        for index, text in raw.items():
            row = index - start
            special[row] = b',{"position":"' + positions[row].tobytes() + b'","event":' + text.encode() + b"}"
        return page_chunks(matrix, special), self.codec.encode(end - 1)


# --------------------------------------------------------------------------- faults, tokens


class Faults:
    """Switchable failures of the journal endpoint; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[list[Any]] = deque()  # [status, remaining, retry_after]
        self.slow_seconds = 0.0

    def fail_next(self, status: int, count: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``count`` journal requests with ``status`` (after earlier pending faults)."""
        if count > 0:
            with self._lock:
                self._pending.append([int(status), int(count), retry_after])

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self.slow_seconds = 0.0

    def take(self) -> tuple[int, float | None] | None:
        with self._lock:
            if not self._pending:
                return None
            fault = self._pending[0]
            fault[1] -= 1
            if fault[1] <= 0:
                self._pending.popleft()
            return fault[0], fault[2]

    def describe(self) -> dict[str, Any]:
        with self._lock:
            pending = [{"status": s, "count": c, "retry_after": r} for s, c, r in self._pending]
        return {"pending": pending, "slow_seconds": self.slow_seconds}


class _TokenStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)

    def issue(self, lifetime: float) -> str:
        token = "sim." + secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._tokens) > 10_000:
                self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = now + lifetime
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_all(self) -> None:
        with self._lock:
            self._tokens.clear()


# --------------------------------------------------------------------------- HTTP


class _Reply(Exception):
    """Ends request handling with this status and JSON error body."""

    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = headers or {}


def _retry_after_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a draining client reuses its connection
    server_version = "AdobePipelineSimulator/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # a page goes out in several writes; don't let Nagle hold the last small one back
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    # ---- plumbing
    def _send(self, status: int, body: bytes | list[bytes | memoryview] = b"",
              headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
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
        self.server.simulator._count_status(status, journal=urlsplit(self.path).path.startswith("/journal/"))

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
            self._send_json(reply.status, {"error": reply.error, "error_description": reply.description},
                            reply.headers)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/_sim/stats": self._stats})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({
            "/ims/exchange/jwt": self._exchange_jwt,
            "/ims/token/v3": self._oauth_token,
            "/_sim/faults": self._admin_faults,
            "/_sim/publish": self._admin_publish,
        })

    # ---- IMS
    def _form(self) -> dict[str, str]:
        fields = parse_qs(self._read_body().decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def _check_client(self, form: dict[str, str]) -> None:
        options = self.server.simulator.options
        if not (hmac.compare_digest(form.get("client_id", ""), options.client_id)
                and hmac.compare_digest(form.get("client_secret", ""), options.client_secret)):
            raise _Reply(401, "invalid_client", "unknown client_id or wrong client_secret")

    def _issue(self, expires_in: float) -> dict[str, Any]:
        simulator = self.server.simulator
        token = simulator._tokens.issue(simulator.options.token_lifetime)
        simulator._bump("tokens_issued")
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
        import jwt  # PyJWT, only needed by this endpoint

        simulator = self.server.simulator
        options = simulator.options
        form = self._form()
        self._check_client(form)
        token = form.get("jwt_token", "")
        if not token:
            raise _Reply(400, "invalid_request", "jwt_token is missing")
        key = simulator._public_key
        if key is None:
            raise _Reply(400, "invalid_signature",
                         "the simulator has no public key to verify against; start it with --public-key PATH")
        bases = self._bases()
        try:
            claims = jwt.decode(
                token, key, algorithms=["RS256"],
                audience=[f"{base}/c/{options.client_id}" for base in bases],
                issuer=options.org_id,
                options={"require": ["exp", "iat", "iss", "sub", "aud"]},
                leeway=30,
            )
        except jwt.InvalidSignatureError:
            raise _Reply(400, "invalid_signature", "the JWT signature does not match the account's public key") from None
        except jwt.ExpiredSignatureError:
            raise _Reply(400, "expired_token", "the JWT has expired (exp is in the past)") from None
        except jwt.PyJWTError as error:
            raise _Reply(400, "invalid_token", f"the JWT is not valid: {error}") from None
        if claims.get("sub") != options.technical_account_id:
            raise _Reply(400, "invalid_token", "sub is not the technical account id of this client")
        if float(claims["exp"]) - float(claims["iat"]) > 86400:
            raise _Reply(400, "invalid_token", "exp is more than 24 h after iat")
        scopes = [name for name, value in claims.items()
                  if value is True and any(name.startswith(f"{base}/s/") for base in bases)]
        if not scopes:
            raise _Reply(400, "invalid_scope", "the JWT has no metascope claim '{ims_url}/s/{scope}': true")
        self._send_json(200, self._issue(int(options.token_lifetime * 1000)))

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
        options = simulator.options
        if self.command != "GET":
            raise _Reply(405, "method_not_allowed", "the journal is read with GET")
        fault = simulator.faults.take()
        if simulator.faults.slow_seconds > 0:
            time.sleep(simulator.faults.slow_seconds)
        if fault is not None:
            status, retry_after = fault
            if retry_after is None and status in (429, 503):
                retry_after = 1.0
            headers = {"Retry-After": _retry_after_text(retry_after)} if retry_after is not None else {}
            raise _Reply(status, "simulated_fault", f"fault injected by the simulator ({status})", headers)

        authorization = self.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not simulator._tokens.valid(token.strip()):
            raise _Reply(401, "invalid_token", "the bearer token is missing, invalid or expired",
                         {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        api_key = self.headers.get("x-api-key")
        org = self.headers.get("x-ims-org-id")
        if not api_key or not org:
            raise _Reply(400, "missing_header", "x-api-key and x-ims-org-id headers are required")
        if api_key != options.client_id:
            raise _Reply(403, "invalid_api_key", "x-api-key is not the client_id of this token")
        if org != options.org_id:
            raise _Reply(403, "invalid_org", "x-ims-org-id is not the organization of these credentials")
        url = urlsplit(self.path)
        consumer = url.path[len("/journal/"):]
        if consumer != options.consumer:
            raise _Reply(403, "not_entitled", f"these credentials are not entitled to consumer {consumer!r}")

        query = {name: values[-1] for name, values in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            limit = int(query.get("limit", ""))
        except ValueError:
            limit = 0
        if not 1 <= limit <= JOURNAL_LIMIT_MAX:
            raise _Reply(400, "invalid_limit", f"limit must be an integer 1..{JOURNAL_LIMIT_MAX}")
        journal = simulator.journal
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
                raise _Reply(410, "position_gone",
                             f"events after this position are older than the journal retention; "
                             f"{first - after - 1} events were purged")
        start = first if after is None else after + 1
        end = min(length, start + limit) if not latest else start
        base = f"{simulator.url}/journal/{consumer}"
        if end <= start:
            headers = {"Retry-After": _retry_after_text(options.idle_retry_after)}
            if after is not None:
                headers["Link"] = f'<{base}?since={journal.codec.encode(after)}&limit={limit}>; rel="next"'
            self._send(204, headers=headers)
            return
        page = journal.page(start, end)
        if page is None:
            raise _Reply(410, "position_gone", "the events after this position were purged meanwhile (retention)")
        items, last = page
        count = end - start
        body = [b'{"events":[', *items, f'],"_page":{{"last":"{last}","count":{count}}}}}'.encode()]
        simulator._bump("events_served", count)
        self._send(200, body, {"Link": f'<{base}?since={last}&limit={limit}>; rel="next"'})

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
                simulator.faults.fail_next(int(document["status"]), int(document.get("count", 1)),
                                           document.get("retry_after"))
            if "slow_seconds" in document:
                simulator.faults.slow_seconds = float(document["slow_seconds"])
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    simulator: Simulator


def _check_options(options: SimulatorOptions) -> None:
    """Refuse settings the generator cannot honour, naming the option and its range."""
    problems = [
        f"{name} must be between 0 and 1, not {getattr(options, name)}"
        for name in ("malformed_share", "duplicate_share", "unknown_trigger_share", "bare_share")
        if not 0 <= getattr(options, name) <= 1
    ]
    if options.people < 1:
        problems.append(f"people must be at least 1, not {options.people}")
    if options.events < 0 or options.rate < 0:
        problems.append("events and rate cannot be negative")
    if options.retention is not None and options.retention < 1:
        problems.append(f"retention must be at least 1 event (or None), not {options.retention}")
    if options.token_lifetime <= 0:
        problems.append(f"token_lifetime must be positive seconds, not {options.token_lifetime}")
    if options.start_time is not None and not 1e9 + 86400 <= options.start_time < 1e10 - max(options.time_span, 0):
        problems.append(f"start_time must be unix seconds between 2001 and 2286, not {options.start_time}")
    if problems:
        raise ConfigError("simulator: " + "; ".join(problems))


class Simulator:
    """The IMS + journal server. ``with Simulator(options) as sim: ... sim.url ...``"""

    def __init__(self, options: SimulatorOptions):
        _check_options(options)
        self.options = options
        self.faults = Faults()
        self.journal = Journal(options)
        self.url = ""
        self._tokens = _TokenStore()
        self._public_key = _load_public_key(options.public_key_pem) if options.public_key_pem else None
        self._counters: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._journal_statuses: Counter[int] = Counter()
        self._stats_lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._publish_lock = threading.Lock()

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Bind ``host:port`` (0: any free port), publish the start events, return the base URL.

        Only docker-compose binds another host (0.0.0.0, inside its network)."""
        if self._server is not None:
            return self.url
        self._server = _Server((host, port), _Handler)
        self._server.simulator = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        options = self.options
        if options.events > 0:
            span = max(options.time_span, 0.0)
            start = options.start_time if options.start_time is not None else time.time() - span
            self.journal.publish(options.events, start, span / options.events)
        self._stopping.clear()
        self._spawn(lambda: self._server.serve_forever(poll_interval=0.05), "simulator-http")
        if options.rate > 0:
            self._spawn(self._publish_steadily, "simulator-rate")
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _publish_steadily(self) -> None:
        rate = self.options.rate
        began = time.time()
        published = 0
        while not self._stopping.wait(0.1):
            due = int((time.time() - began) * rate) - published
            if due > 0:
                with self._publish_lock:
                    self.journal.publish(due, began + published / rate, 1.0 / rate)
                published += due

    def publish(self, n: int) -> None:
        """Append ``n`` generated events fired over the last moments (at most a minute)."""
        if n <= 0:
            return
        spread = min(60.0, n / 1000.0)
        with self._publish_lock:
            self.journal.publish(n, time.time() - spread, spread / n)

    def publish_raw(self, messages: list) -> None:
        """Append these exact event objects (any JSON value) to the journal."""
        self.journal.publish_raw([json.dumps(message, separators=(",", ":")) for message in messages])

    def expire_tokens(self) -> None:
        """Every token issued so far is refused (401) from now on."""
        self._tokens.expire_all()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: responses by status (all, and of the journal), tokens issued, events served..."""
        with self._stats_lock:
            counters = dict(self._counters)
            statuses = dict(self._statuses)
            journal_statuses = dict(self._journal_statuses)
        return {
            "requests_by_status": statuses,
            "journal_requests": journal_statuses,
            "tokens_issued": counters.get("tokens_issued", 0),
            "events_served": counters.get("events_served", 0),
            "journal_length": self.journal.length,
            "first_retained": self.journal.first_retained,
        }

    def _bump(self, name: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._counters[name] += amount

    def _count_status(self, status: int, journal: bool) -> None:
        with self._stats_lock:
            self._statuses[status] += 1
            if journal:
                self._journal_statuses[status] += 1


def _load_public_key(pem: bytes | str) -> Any:
    """An RSA public key from a public-key PEM or a certificate PEM (what Adobe's console takes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"BEGIN CERTIFICATE" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise ConfigError(f"simulator: public_key_pem is not a PEM public key or certificate ({error}); "
                          f"create a key pair with: python -m include.cli keys create DIR") from None


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="simulator_command", required=True, metavar="ACTION")
    defaults = SimulatorOptions()
    serve = commands.add_parser("serve", help="serve IMS and the journal on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (docker-compose: 0.0.0.0)")
    serve.add_argument("--events", type=int, default=defaults.events, help="events published at start")
    serve.add_argument("--rate", type=float, default=defaults.rate, help="events per second published after start")
    serve.add_argument("--people", type=int, default=defaults.people, help="population size")
    serve.add_argument("--malformed-share", type=float, default=defaults.malformed_share)
    serve.add_argument("--duplicate-share", type=float, default=defaults.duplicate_share)
    serve.add_argument("--unknown-trigger-share", type=float, default=defaults.unknown_trigger_share)
    serve.add_argument("--bare-share", type=float, default=defaults.bare_share)
    serve.add_argument("--time-span", type=float, default=defaults.time_span,
                       help="seconds over which the start events' trigger times spread")
    serve.add_argument("--token-lifetime", type=float, default=defaults.token_lifetime, help="seconds")
    serve.add_argument("--public-key", type=Path, help="public key or certificate PEM that verifies JWTs")
    serve.add_argument("--client-id", default=defaults.client_id)
    serve.add_argument("--client-secret", default=defaults.client_secret)
    serve.add_argument("--org-id", default=defaults.org_id)
    serve.add_argument("--technical-account-id", default=defaults.technical_account_id)
    serve.add_argument("--consumer", default=defaults.consumer)
    serve.add_argument("--retention", type=int, help="keep only the newest N events")
    serve.add_argument("--seed", type=int, default=defaults.seed)
    audience = commands.add_parser("audience", help="write the recipients CSV of the simulated population")
    audience.add_argument("path", type=Path)
    audience.add_argument("--people", type=int, default=defaults.people)
    audience.add_argument("--seed", type=int, default=1)
    audience.add_argument("--opted-out-share", type=float, default=0.02)
    audience.add_argument("--invalid-email-share", type=float, default=0.01)


def main(args: argparse.Namespace) -> int:
    if args.simulator_command == "audience":
        path = write_audience_csv(args.path, args.people, args.seed, args.opted_out_share, args.invalid_email_share)
        print(f"wrote {args.people} recipients to {path}")
        return 0
    public_key = None
    if args.public_key is not None:
        try:
            public_key = args.public_key.read_bytes()
        except OSError as error:
            raise ConfigError(f"--public-key {args.public_key}: cannot read it ({error.strerror}); "
                              f"create a key pair with: python -m include.cli keys create DIR") from None
    options = SimulatorOptions(
        client_id=args.client_id, client_secret=args.client_secret, org_id=args.org_id,
        technical_account_id=args.technical_account_id, public_key_pem=public_key, consumer=args.consumer,
        token_lifetime=args.token_lifetime, events=args.events, rate=args.rate, people=args.people,
        malformed_share=args.malformed_share, duplicate_share=args.duplicate_share,
        unknown_trigger_share=args.unknown_trigger_share, bare_share=args.bare_share,
        retention=args.retention, time_span=args.time_span, seed=args.seed,
    )
    simulator = Simulator(options)
    try:
        url = simulator.start(args.port, args.host)
    except OSError as error:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({error}); pick another --port") from None
    print(f"Adobe pipeline simulator at {url}  (IMS and journal; consumer {options.consumer})", flush=True)
    print(f"  journal: {url}/journal/{options.consumer}   events: {simulator.journal.length}"
          f"{f'  +{options.rate:g}/s' if options.rate else ''}", flush=True)
    if public_key is None:
        print("  no --public-key: JWT exchange refused; OAuth (auth=oauth) works", flush=True)
    print(f"  faults:  curl -d '{{\"status\": 503, \"count\": 3}}' {url}/_sim/faults   stats: {url}/_sim/stats",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        simulator.stop()
    return 0
