"""Import of a JSON-lines export of past events (``python -m include.cli import PATH``), for a backfill.

Idempotent like the drain: importing a file twice stores each event once. The journal position
is left alone; the imported events carry the position ``import``, and only backfill runs (of the
intervals their times fall in) process them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from itertools import islice

from sqlalchemy import Engine

from include.config import TriggersConfig
from include.staging.parser import IMPORTED_POSITION
from include.staging.stager import Stager


def read_export(lines: Iterable[bytes]) -> Iterable[tuple[str, None, bytes]]:
    """``(IMPORTED_POSITION, None, raw bytes)`` per line of a JSON-lines export; staging reads
    each line as the drain reads an event (one that is not UTF-8 or JSON is quarantined)."""
    for line in lines:
        raw = line.strip()
        if raw:
            yield IMPORTED_POSITION, None, raw


def import_export(
    engine: Engine, config: TriggersConfig, path: str, chunk_size: int = 5_000
) -> dict[str, int]:
    """Stage the events of a JSON-lines export (one journal event per line), a transaction per
    ``chunk_size`` lines; the counts of lines, new rows, quarantined and ignored events."""
    stager = Stager(engine, config)
    counts = {"lines": 0, "staged": 0, "quarantined": 0, "ignored": 0}
    with open(path, "rb") as export:
        events = read_export(export)
        while chunk := list(islice(events, chunk_size)):
            page = stager.parser.parse_items(chunk, time.time())
            staged, refused = stager.store(page)
            counts["staged"] += staged
            counts["lines"] += page.count
            counts["quarantined"] += page.quarantined + refused
            counts["ignored"] += page.ignored
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a JSON-lines export: one journal event (SPEC section 3) per line")


def main(args: argparse.Namespace) -> int:
    """``import PATH``: stage an export of past events, then backfill their range."""
    from include.resources import open_resources

    with open_resources() as res:
        counts = import_export(res.engine, res.config, args.path)
    print(json.dumps(counts))
    return 0
