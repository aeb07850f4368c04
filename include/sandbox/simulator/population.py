"""The simulated shoppers: person ``i``'s identity (the same in every event and for every seed) and
the recipients CSV of SPEC section 5 that matches them."""

from __future__ import annotations

import csv
import os
import random
import unicodedata
from pathlib import Path

import numpy as np

from include.sandbox.simulator.ascii_arrays import decimal_chars, mix, rows_text, u64

AUDIENCE_COLUMNS = (
    "recipient_id",
    "email",
    "first_name",
    "last_name",
    "locale",
    "shopper_id",
    "mc_id",
    "opted_out",
)

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
_INVALID_EMAILS = (
    "not-an-email",
    "{first}@",
    "{first}@@example.com",
    "{first} {last}@example.com",
    "@example.com",
)


def identity_chars(people: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 9) shopper-id digits and (n, 38) mcId digits of persons ``people`` (seed independent)."""
    people = np.asarray(people, dtype=np.int64)
    salt = u64(0x5EED_1D3E_7717_0000)
    first = mix(people.astype(np.uint64) * u64(2) + salt)
    second = mix(people.astype(np.uint64) * u64(2) + salt + u64(1))
    high = (u64(1) + first % u64(9)) * u64(10**18) + (first >> u64(4)) % u64(10**18)  # no leading zero
    low = second % u64(10**19)
    mc_chars = decimal_chars(np.stack([high, low], axis=1), 19).reshape(len(people), 38)
    return decimal_chars(people, 9), mc_chars


def person_identity(i: int) -> tuple[str, str]:
    """Person ``i``'s shopper id (the eVar01 value) and 38-digit mcId; the same for every seed."""
    shopper, mc_id = identity_chars(np.array([i]))
    return "SHOP-" + shopper.tobytes().decode(), mc_id.tobytes().decode()


def _ascii_local_part(name: str) -> str:
    """ "Weiß" -> "weiss", "Zoé" -> "zoe", "O'Brien" -> "obrien": a plain ASCII address part."""
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
            shoppers, mc_ids = identity_chars(indexes)
            shopper_texts, mc_texts = rows_text(shoppers), rows_text(mc_ids)
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
