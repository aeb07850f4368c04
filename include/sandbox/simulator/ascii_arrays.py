"""Vectorised building blocks of the generator: random 64-bit words from integers, and numbers
rendered as fixed-width ASCII digits in numpy byte arrays (no Python code per value)."""

from __future__ import annotations

from functools import cache

import numpy as np

MASK64 = (1 << 64) - 1
SPACE = ord(" ")


def share_threshold(value: float, bits: int) -> int:
    """A probability as a threshold on a ``bits``-bit random integer."""
    return int(round(min(max(value, 0.0), 1.0) * (1 << bits)))


@cache
def u64(value: int) -> np.uint64:
    """A cached numpy uint64 constant (building one costs more than the operation it feeds)."""
    return np.uint64(value & MASK64)


def mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: well-spread 64-bit words from consecutive integers (vectorised)."""
    z = values.astype(np.uint64) + u64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
    return z ^ (z >> u64(31))


def bits(words: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``width`` bits starting at bit ``shift`` of random words viewed as int64 (the mask drops
    the sign bits an arithmetic shift brings in)."""
    return (words >> shift) & ((1 << width) - 1)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex_chars(words: np.ndarray) -> np.ndarray:
    """(n, k) uint64 -> (n, 16k) ASCII hex digits, big-endian, as uint8."""
    octets = np.ascontiguousarray(words.astype(">u8")).view(np.uint8).reshape(len(words), -1)
    nibbles = np.empty((len(words), octets.shape[1] * 2), dtype=np.uint8)
    nibbles[:, 0::2] = octets >> 4
    nibbles[:, 1::2] = octets & 15
    return _HEX_DIGITS[nibbles]


def uuid_chars(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """(n, 36) ASCII version-4 UUIDs from two uint64 columns."""
    words = np.stack(
        [
            (high & u64(0xFFFFFFFFFFFF0FFF)) | u64(0x4000),
            (low & u64(0x3FFFFFFFFFFFFFFF)) | u64(0x8000000000000000),
        ],
        axis=1,
    )
    hexes = hex_chars(words)
    out = np.full((len(words), 36), ord("-"), dtype=np.uint8)
    for begin, end, dashes in ((0, 8, 0), (8, 12, 1), (12, 16, 2), (16, 20, 3), (20, 32, 4)):
        out[:, begin + dashes : end + dashes] = hexes[:, begin:end]
    return out


_QUADS = np.frombuffer("".join(f"{n:04d}" for n in range(10_000)).encode(), dtype=np.uint32)


def decimal_chars(values: np.ndarray, width: int) -> np.ndarray:
    """values (any shape, 0 <= v < 10**width) -> shape + (width,) zero-padded ASCII digits."""
    remaining = values.astype(np.uint64)
    quads = -(-width // 4)
    out = np.empty(values.shape + (quads,), dtype=np.uint32)  # four ASCII digits per uint32
    ten_thousand = u64(10_000)
    for quad in range(quads - 1, -1, -1):  # uint64 // is numpy's fast integer division
        quotient = remaining // ten_thousand
        out[..., quad] = _QUADS[(remaining - quotient * ten_thousand).astype(np.intp)]
        remaining = quotient
    return out.view(np.uint8)[..., 4 * quads - width :]


def space_padded(chars: np.ndarray) -> np.ndarray:
    """Zero-padded digits -> right-aligned with leading spaces (JSON allows them before a value)."""
    leading = np.cumprod(chars[..., :-1] == ord("0"), axis=-1).astype(bool)
    chars[..., :-1][leading] = ord(" ")
    return chars


def rows_text(chars: np.ndarray) -> list[str]:
    """Rows of an (n, width) ASCII array as n strings."""
    width = chars.shape[1]
    text = np.ascontiguousarray(chars).tobytes().decode("ascii")
    return [text[i : i + width] for i in range(0, len(text), width)]
