"""Generated events rendered as JSON journal items, deterministically from (seed, event number).

A page is one numpy byte matrix, a journal item per row, filled column by column: no Python code
runs per event (the ingestion bench drives a million events through it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from include.sandbox.simulator.ascii_arrays import (
    SPACE,
    bits,
    decimal_chars,
    mix,
    share_threshold,
    space_padded,
    u64,
    uuid_chars,
)
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import identity_chars

CART_ABANDONMENT = "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf"
BROWSE_ABANDONMENT = "5c2d8e71-4b0a-4f3e-9d6c-1a7b8e9f0c21"
PURCHASE = "9b1f6a52-0c1e-4d5e-8a0e-5f2d7c3b9e40"
TRIGGER_LABELS = {
    CART_ABANDONMENT: "cart_abandonment",
    BROWSE_ABANDONMENT: "browse_abandonment",
    PURCHASE: "purchase",
}
# Trigger definitions the project's configuration does not know (other teams' triggers).
UNKNOWN_TRIGGERS = (
    "0d4e7c19-8a2b-4f6e-b1c3-7e9a5d2f8b64",
    "a71f3b2c-5e8d-4c09-9f6a-3b2e1d7c5a98",
    "e2c95a40-7b1d-4e3f-8c62-9d0a4f1b7e35",
)
MALFORMED_KINDS = ("not_object", "no_trigger_id", "bad_timestamp", "oversized")
CATALOGUE_SIZE = 2000  # SKU-1 .. SKU-2000
OVERSIZED_PRODUCTS = 2500  # about 27 kB of JSON, above the default max_msg_size of 20,000 bytes
HOT_SHARE = 0.10  # share of events fired by the hot 1 % of people (repeat visitors)

_TRIGGER_IDS = (CART_ABANDONMENT, BROWSE_ABANDONMENT, PURCHASE, *UNKNOWN_TRIGGERS)
_BROWSE_PAGES = (
    "home",
    "search:results",
    "category:shoes",
    "category:bags",
    "category:outdoor",
    "category:sale",
)
# page codes: 0 none, 1..CATALOGUE_SIZE a product page, then the browse pages, then the final pages
_PAGE_BROWSE = CATALOGUE_SIZE + 1
_PAGE_CART, _PAGE_SHIPPING, _PAGE_CONFIRMATION = (_PAGE_BROWSE + len(_BROWSE_PAGES) + k for k in range(3))
_PAGE_NAMES = (
    "",
    *(f"product:SKU-{n}" for n in range(1, CATALOGUE_SIZE + 1)),
    *_BROWSE_PAGES,
    "checkout:cart",
    "checkout:shipping",
    "checkout:confirmation",
)
_SKU_NAMES = ("", *(f"SKU-{n}" for n in range(1, CATALOGUE_SIZE + 1)))
_SKU_CELL, _PAGE_CELL, _TIME_CELL = 11, 23, 11  # widths of one array element with its comma and padding


def _cells(names: tuple[str, ...], width: int, separator: str) -> np.ndarray:
    """ASCII table: row k = ``separator"names[k]"`` left-aligned in ``width`` (row of "" = blank)."""
    text = "".join((f'{separator}"{name}"' if name else "").ljust(width) for name in names)
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).reshape(len(names), width)


_SKU_FIRST, _SKU_NEXT = _cells(_SKU_NAMES, _SKU_CELL, ""), _cells(_SKU_NAMES, _SKU_CELL, ",")
_PAGE_CELLS = _cells(_PAGE_NAMES, _PAGE_CELL, "")
_TRIGGER_ID_CHARS = np.frombuffer("".join(_TRIGGER_IDS).encode(), dtype=np.uint8).reshape(
    len(_TRIGGER_IDS), 36
)
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


def _item_template(org_id: str) -> _Template:
    """A journal item in the envelope form: ``,{"position":..,"event":{..}}`` with every slot."""
    # one line per part of the JSON, as it nests
    return _Template([
        ',{"position":"', ("position", 16), '","event":', ("bracket", 1), ("body",), ("head",),
        '{"event_id":"', ("event_id", 36),
        '","event":{"envelopeType":"DATA","topic":"triggers","partition":', ("partition", 2),
        ',"offset":', ("offset", 10), ',"createTime":', ("create_ms", 13),
        ',"com.adobe.mcloud.pipeline.pipelineMessage":{"header":{"messageType":"TRIGGER",'
        '"source":"triggers","sentTime":', ("sent_ms", 13),
        f',"imsOrg":{json.dumps(org_id)},"messageId":"', ("message_id", 36),
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
    ])  # fmt: skip


def _bare_head_template(width: int) -> _Template:
    """The bare trigger form's head (SPEC section 3), as wide as the envelope's head it replaces."""
    parts = ['{"triggerId":"', ("trigger_id", 36), '","timeGMT":', ("time_s", 10), ',"mcId":"', ("mc_id", 38)]
    return _Template([*parts, '"', _DIMENSIONS_OPEN], width)


def _string_body_template(width: int) -> _Template:
    """A message that arrived as a JSON string (malformed), as wide as the event body it replaces."""
    parts = ['"TRIGGER ', ("trigger_id", 36), " ", ("mc_id", 38), " ", ("trigger_ms", 13)]
    return _Template([*parts, ' truncated by the sender"'], width)


@dataclass
class _Draws:
    """The random draws of a page of events, one array entry per event."""

    numbers: np.ndarray  # generated-event numbers
    whens: np.ndarray  # trigger times, unix s
    words: np.ndarray  # (n, WORDS) random words as int64; w0..w3 are its first columns
    w0: np.ndarray
    w1: np.ndarray
    w2: np.ndarray  # a copy: a purchase that follows a cart takes the cart's (same products)
    w3: np.ndarray
    malformed: np.ndarray  # index into MALFORMED_KINDS, or -1
    trigger: np.ndarray  # index into _TRIGGER_IDS
    people: np.ndarray  # the person who fired each event


class _Header(NamedTuple):
    """Rendered columns that the rare shapes reuse, as (n, width) ASCII."""

    trigger_ids: np.ndarray
    trigger_ms: np.ndarray
    mc_ids: np.ndarray


class RenderedRows(NamedTuple):
    matrix: np.ndarray  # (n, width) ASCII, a journal item per row, each starting with a comma
    special: dict[int, bytes]  # rows whose item does not fit the matrix (oversized), by row number


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
        seed_digest = hashlib.blake2b(b"events:%d" % options.seed, digest_size=8).digest()
        self._key = u64(int.from_bytes(seed_digest, "little"))
        self._malformed = share_threshold(options.malformed_share, 20)
        self._unknown = share_threshold(options.unknown_trigger_share, 16)
        self._bare = share_threshold(options.bare_share, 16)
        self._hot = share_threshold(HOT_SHARE, 8)
        self.item = _item_template(options.org_id)
        marks = self.item.marks
        self.bare_head = _bare_head_template(marks["head_end"] - marks["head"])
        self.string_body = _string_body_template(marks["body_end"] - marks["body"])

    # ---- random draws
    def _words(self, numbers: np.ndarray) -> np.ndarray:
        """(n, WORDS) random 64-bit words of events ``numbers``, viewed as int64."""
        base = np.asarray(numbers).astype(np.uint64) * u64(self.WORDS) + self._key
        return mix(base[:, None] + np.arange(self.WORDS, dtype=np.uint64)[None, :]).view(np.int64)

    def _kinds(self, w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(malformed kind index or -1, trigger index: 0 cart, 1 browse, 2 purchase, 3+ unknown)."""
        malformed = np.where(bits(w0, 0, 20) < self._malformed, bits(w0, 20, 2), -1)
        unknown_pick = bits(w0, 22, 16)
        pick = bits(w0, 38, 8)  # 55 % cart, 30 % browse, 15 % purchase
        trigger = np.where(pick < 141, 0, np.where(pick < 218, 1, 2))
        trigger = np.where(unknown_pick < self._unknown, 3 + unknown_pick % len(UNKNOWN_TRIGGERS), trigger)
        return malformed, np.where(malformed >= 0, 0, trigger)

    def _people(self, w1: np.ndarray) -> np.ndarray:
        who = bits(w1, 8, 32)
        hot = bits(w1, 0, 8) < self._hot  # repeat visitors: the hot 1 % fire 10 % of the events
        return np.where(hot, (who % self.hot_people) * 97 % self.people, who % self.people)

    def kind_of(self, g: int) -> tuple[str | None, str]:
        """(malformed kind or None, triggerId) of generated event ``g`` (for tests and reports)."""
        malformed, trigger = self._kinds(self._words(np.array([g]))[:, 0])
        return (MALFORMED_KINDS[malformed[0]] if malformed[0] >= 0 else None), _TRIGGER_IDS[trigger[0]]

    def _draw(self, numbers: np.ndarray, whens: np.ndarray, steps: np.ndarray) -> _Draws:
        words = self._words(numbers)
        malformed, trigger = self._kinds(words[:, 0])
        draws = _Draws(
            numbers=numbers,
            whens=whens,
            words=words,
            w0=words[:, 0],
            w1=words[:, 1],
            w2=words[:, 2].copy(),
            w3=words[:, 3],
            malformed=malformed,
            trigger=trigger,
            people=self._people(words[:, 1]),
        )
        self._follow_carts(draws, steps)
        return draws

    def _follow_carts(self, draws: _Draws, steps: np.ndarray) -> None:
        """Three quarters of purchases follow a cart abandonment by the same shopper a few minutes
        earlier in the journal, with the same products: look back up to three times for one."""
        follows = np.flatnonzero((draws.trigger == 2) & (bits(draws.w1, 51, 2) != 0))
        if not len(follows):
            return
        gap = 90.0 + bits(draws.w1[follows], 53, 10)  # 1.5 to 18.5 minutes
        step = steps[follows]
        found = np.zeros(len(follows), dtype=bool)
        for attempt in range(3):
            back = np.where(
                step > 0, (gap + 120 * attempt) / np.where(step > 0, step, 1), 1 + 7 * attempt + gap % 50
            )
            earlier = draws.numbers[follows] - np.clip(back, 1, 1 << 40).astype(np.int64)
            earlier_words = self._words(np.maximum(earlier, 0))
            earlier_malformed, earlier_trigger = self._kinds(earlier_words[:, 0])
            hit = ~found & (earlier >= 0) & (earlier_malformed < 0) & (earlier_trigger == 0)
            draws.people[follows[hit]] = self._people(earlier_words[hit, 1])
            draws.w2[follows[hit]] = earlier_words[hit, 2]
            found |= hit

    # ---- rendering
    def rows(
        self, numbers: np.ndarray, whens: np.ndarray, steps: np.ndarray, positions: np.ndarray
    ) -> RenderedRows:
        """The journal items of events ``numbers`` as an (n, width) ASCII matrix, one per row,
        each starting with a comma; plus the rows that do not fit it (oversized), as bytes.

        ``whens``: trigger times (unix s); ``steps``: the publishing interval near each event;
        ``positions``: (n, 16) ASCII of the items' positions.
        """
        draws = self._draw(np.asarray(numbers, dtype=np.int64), whens, steps)
        slots = self.item.slots
        matrix = self.item.matrix(len(draws.numbers))
        matrix[:, slots["position"]] = positions
        header = self._fill_header(matrix, draws)
        skus = self._fill_products(matrix, draws)
        self._fill_page_name(matrix, draws, skus)
        self._fill_hit_times(matrix, draws)
        matrix[:, slots["tail"]] = _ascii("}}}}")  # closes trigger, pipelineMessage, event and envelope
        self._shape_quirks(matrix, draws)
        self._shape_bare_and_malformed(matrix, draws, header)
        oversized = np.flatnonzero(draws.malformed == 3)
        special = {}
        products = slots["skus"]
        for row in oversized.tolist():
            text = matrix[row].tobytes()
            special[row] = text[: products.start] + _OVERSIZED_SKUS + text[products.stop :]
        return RenderedRows(matrix, special)

    def _fill_header(self, matrix: np.ndarray, draws: _Draws) -> _Header:
        """Ids, offsets, times and identities: the slots every item has."""
        slots = self.item.slots
        trigger_ms = (draws.whens * 1000).astype(np.int64)
        sent_ms = trigger_ms + bits(draws.w2, 50, 4)
        create_ms = sent_ms + 5 + bits(draws.w2, 54, 5)
        millis = decimal_chars(np.stack([trigger_ms, sent_ms, create_ms], axis=1), 13)
        shoppers, mc_ids = identity_chars(draws.people)
        trigger_ids = _TRIGGER_ID_CHARS[draws.trigger]
        unsigned = draws.words.view(np.uint64)
        matrix[:, slots["event_id"]] = uuid_chars(unsigned[:, 6], unsigned[:, 7])
        matrix[:, slots["partition"]] = space_padded(decimal_chars(bits(draws.w2, 46, 4), 2))
        matrix[:, slots["offset"]] = space_padded(decimal_chars(500_000_000 + draws.numbers, 10))
        matrix[:, slots["create_ms"]] = millis[:, 2]
        matrix[:, slots["sent_ms"]] = millis[:, 1]
        matrix[:, slots["message_id"]] = uuid_chars(unsigned[:, 4], unsigned[:, 5])
        matrix[:, slots["trigger_id"]] = trigger_ids
        matrix[:, slots["trigger_ms"]] = millis[:, 0]
        matrix[:, slots["mc_id"]] = mc_ids
        matrix[:, slots["shopper"]] = shoppers
        return _Header(trigger_ids, millis[:, 0], mc_ids)

    def _fill_products(self, matrix: np.ndarray, draws: _Draws) -> np.ndarray:
        """1-4 SKUs from the catalogue; returns the SKU numbers, (n, 4), 0 where none."""
        w2 = draws.w2
        sku_count = 1 + bits(w2, 0, 2)
        skus = np.stack([1 + bits(w2, 2 + 11 * k, 11) % CATALOGUE_SIZE for k in range(4)], axis=1)
        skus[np.arange(4)[None, :] >= sku_count[:, None]] = 0
        cells = [_SKU_FIRST[skus[:, 0]], _SKU_NEXT[skus[:, 1:]].reshape(len(skus), -1)]
        matrix[:, self.item.slots["skus"]] = np.concatenate(cells, axis=1)
        return skus

    def _fill_page_name(self, matrix: np.ndarray, draws: _Draws, skus: np.ndarray) -> None:
        """The page the trigger fired on (one value, as in Adobe's sample)."""
        trigger, w3 = draws.trigger, draws.w3
        page = np.select(
            [trigger == 0, trigger == 1, trigger == 2],
            [np.where(bits(w3, 61, 3) < 2, _PAGE_SHIPPING, _PAGE_CART), skus[:, 0], _PAGE_CONFIRMATION],
            _PAGE_BROWSE + bits(w3, 0, 8) % len(_BROWSE_PAGES),
        )
        matrix[:, self.item.slots["page"]] = _PAGE_CELLS[page]

    def _fill_hit_times(self, matrix: np.ndarray, draws: _Draws) -> None:
        """The last hit some minutes before the trigger fired, the earlier ones 15-142 s apart;
        six cells, of which an event shows its last 2-6."""
        n, w3 = len(draws.numbers), draws.w3
        hits = 2 + bits(draws.w1, 40, 3) % 5
        last_hit = np.floor(draws.whens).astype(np.int64) - 60 - bits(w3, 16, 10)
        gaps = np.stack([15 + bits(w3, 26 + 7 * k, 7) for k in range(5)], axis=1)
        ascending = np.concatenate(
            [last_hit[:, None] - np.cumsum(gaps, axis=1)[:, ::-1], last_hit[:, None]], axis=1
        )
        cells = np.full((n, 6, _TIME_CELL), ord(","), dtype=np.uint8)
        cells[:, :, 1:] = decimal_chars(ascending, 10)
        first_shown = 6 - hits
        cells[np.arange(6)[None, :] < first_shown[:, None]] = SPACE
        cells[np.arange(n), first_shown, 0] = SPACE
        matrix[:, self.item.slots["times"]] = cells.reshape(n, -1)

    def _shape_quirks(self, matrix: np.ndarray, draws: _Draws) -> None:
        """Quirky dimensions (stray white space, empty data, missing ones), each a masked rewrite."""
        item = self.item
        quirk = np.where(
            draws.malformed == 3, 255, bits(draws.w1, 43, 8)
        )  # an oversized message keeps its products
        blank = np.uint8(SPACE)
        evar = item.marks["evar"]
        matrix[quirk < 5, evar : evar + 10] = _ascii('" eVar01":')  # stray white space, as in Adobe's sample
        matrix[quirk == 7, item.slots["skus"]] = blank  # a dimension whose data is empty
        matrix[quirk == 8, item.span("evar", "evar_end")] = blank  # missing dimensions
        matrix[quirk == 9, item.span("products", "products_end")] = blank
        matrix[quirk == 10, item.span("pages", "pages_end")] = blank

    def _shape_bare_and_malformed(self, matrix: np.ndarray, draws: _Draws, header: _Header) -> None:
        """The bare form and the malformed kinds, each a masked rewrite of rows."""
        item, malformed, w0 = self.item, draws.malformed, draws.w0
        slots, span = item.slots, item.span
        blank = np.uint8(SPACE)
        matrix[malformed == 1, span("trigger_id_pair", "trigger_id_pair_end")] = blank
        matrix[malformed == 2, slots["trigger_ms"]] = _ascii('"yesterday"  ')
        bare = (bits(w0, 46, 16) < self._bare) & (malformed < 0)
        as_list = (malformed == 0) & (bits(w0, 62, 1) == 0)
        as_string = (malformed == 0) & (bits(w0, 62, 1) == 1)
        bare_rows = np.flatnonzero(bare | as_list)
        if len(bare_rows):
            head = self.bare_head.matrix(len(bare_rows))
            head[:, self.bare_head.slots["trigger_id"]] = header.trigger_ids[bare_rows]
            seconds = np.floor(draws.whens[bare_rows]).astype(np.int64)
            head[:, self.bare_head.slots["time_s"]] = decimal_chars(seconds, 10)
            head[:, self.bare_head.slots["mc_id"]] = header.mc_ids[bare_rows]
            matrix[bare_rows, span("head", "head_end")] = head
            matrix[bare_rows, slots["tail"]] = _ascii("}   ")
        matrix[as_list, slots["bracket"]] = _ascii("[")
        matrix[as_list, slots["tail"]] = _ascii("}]  ")
        string_rows = np.flatnonzero(as_string)
        if len(string_rows):
            body = self.string_body.matrix(len(string_rows))
            body[:, self.string_body.slots["trigger_id"]] = header.trigger_ids[string_rows]
            body[:, self.string_body.slots["mc_id"]] = header.mc_ids[string_rows]
            body[:, self.string_body.slots["trigger_ms"]] = header.trigger_ms[string_rows]
            matrix[string_rows, slots["bracket"]] = blank
            matrix[string_rows, span("body", "body_end")] = body

    def render_events(self, numbers: np.ndarray, whens: np.ndarray, steps: np.ndarray) -> list[str]:
        """Each event's JSON text alone (tests, tools); the server uses ``rows``."""
        positions = np.full((len(numbers), 16), ord("0"), dtype=np.uint8)
        matrix, special = self.rows(numbers, whens, steps, positions)
        start = self.item.slots["bracket"].start
        texts = [special.get(row, matrix[row].tobytes()) for row in range(len(numbers))]
        return [text[start:-1].decode("ascii").strip() for text in texts]
