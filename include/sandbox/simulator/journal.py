"""The journal of one consumer: opaque positions, what each holds (8 bytes per generated event, or
a raw event's JSON text), retention, and its pages rendered as buffers ready to send."""

from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections import deque
from typing import NamedTuple

import numpy as np

from include.sandbox.simulator.ascii_arrays import MASK64, SPACE, hex_chars, u64
from include.sandbox.simulator.events import EventFactory
from include.sandbox.simulator.options import SimulatorOptions


def page_chunks(matrix: np.ndarray, special: dict[int, bytes]) -> list[bytes | memoryview]:
    """The comma-separated journal items of a page, as buffers to send in order without copying:
    runs of matrix rows, with the ``special`` rows swapped in; the first row's comma is blanked."""
    if len(matrix):
        matrix[0, 0] = SPACE
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
        return f"{(index * self._mul + self._add) & MASK64:016x}"

    def encode_chars(self, start: int, end: int) -> np.ndarray:
        """encode() of every index in start..end-1 as an (n, 16) ASCII array."""
        indexes = np.arange(start, end, dtype=np.uint64)
        return hex_chars((indexes * u64(self._mul) + u64(self._add))[:, None])

    def decode(self, position: str) -> int | None:
        if len(position) != 16:
            return None
        try:
            value = int(position, 16)
        except ValueError:
            return None
        return ((value - self._add) * self._inverse) & MASK64


class JournalPage(NamedTuple):
    chunks: list[bytes | memoryview]  # the JSON list content of the items, to send in order
    last: str  # the position of the last item


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
        self._raw: dict[int, bytes] = {}
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

    def publish_raw(self, texts: list[str | bytes]) -> None:
        """Append events as these exact texts, sent as they are (bytes may be any bytes at all)."""
        with self._lock:
            for text in texts:
                position = self.length
                self._slots.append(self.RAW)
                self._raw[position] = text if isinstance(text, bytes) else text.encode()
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

    def page(self, start: int, end: int) -> JournalPage | None:
        """The journal items of indexes start..end-1; None if they were purged meanwhile (retention)."""
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
            special[row] = b',{"position":"' + positions[row].tobytes() + b'","event":' + text + b"}"
        return JournalPage(page_chunks(matrix, special), self.codec.encode(end - 1))
