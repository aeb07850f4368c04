"""``python -m include.cli suppressions add|remove|list|import|export``: the list by hand and as CSV.

The CSV has the table's columns (``email,campaign_id,reason,source,created_at``); an import
needs only ``email``: an empty ``campaign_id`` means every campaign, an empty ``reason`` is
``--reason`` (default ``manual``), an empty ``created_at`` is now (else seconds since the epoch
or an ISO 8601 time). Every line is either written or reported with its number and the fix; a
bad line never stops the others. A large file is written in parts of ``IMPORT_PART`` rows, one
bulk write (COPY on PostgreSQL) each, and can be imported again: what is present stays as it is.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine

from include.errors import InvalidEmailError, SuppressionFileError
from include.suppressions.addresses import normalize_email
from include.suppressions.store import COLUMNS, REASONS, Suppression, add, add_many, listed, remove

IMPORT_PART = 50_000
MAX_REPORTED = 50  # bad lines printed one by one; the rest are counted
_CAMPAIGN_ID = re.compile(r"[A-Za-z0-9_.-]+")  # the configuration's campaign id pattern
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class ImportReport:
    lines: int = 0
    added: int = 0
    already_present: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.errors)

    def summary(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "added": self.added,
            "already_present": self.already_present,
            "rejected": self.rejected,
        }


def _text(value: Any) -> str:
    """A CSV cell as storable text: undecodable bytes as U+FFFD, control characters dropped."""
    text = "" if value is None else str(value)
    return _CONTROL.sub("", text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")).strip()


def _created_at(value: str) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def parse_line(cells: dict[str, Any], default_reason: str, default_source: str) -> Suppression:
    """One CSV record as a Suppression, else ValueError whose message says what to fix."""
    raw_email = cells.get("email")
    try:
        email = normalize_email(_text(raw_email)).lower()
    except InvalidEmailError:
        raise ValueError(
            f"email {_text(raw_email)[:80]!r} is not one plain address (local@domain); correct it "
            "or delete the line"
        ) from None
    reason = _text(cells.get("reason")) or default_reason
    if reason not in REASONS:
        raise ValueError(f"reason {reason[:40]!r} is not one of {', '.join(REASONS)}; write one of them")
    campaign = _text(cells.get("campaign_id"))
    if campaign and not _CAMPAIGN_ID.fullmatch(campaign):
        raise ValueError(
            f"campaign_id {campaign[:40]!r} is not a campaign id (letters, digits, _ . -); leave it "
            "empty for every campaign"
        )
    created = _text(cells.get("created_at"))
    try:
        created_at = _created_at(created)
    except (ValueError, OverflowError):
        raise ValueError(
            f"created_at {created[:40]!r} is neither seconds since 1970 nor an ISO 8601 time; fix it "
            "or leave it empty (now)"
        ) from None
    source = _text(cells.get("source"))[:500] or default_source
    return Suppression(email, reason, campaign, source, created_at)


def read_suppressions(
    stream: IO[str], report: ImportReport, default_reason: str, default_source: str
) -> Iterator[Suppression]:
    """The good records of a CSV stream; each bad one is added to ``report.errors`` with its line."""
    reader = csv.reader(stream)
    try:
        header = [_text(name).lower().lstrip("\ufeff") for name in next(reader)]
    except (StopIteration, csv.Error) as error:
        raise SuppressionFileError(
            f"no CSV header line ({error or 'empty file'}); the first line must name the columns, e.g. {','.join(COLUMNS)}"
        ) from None
    unknown = [name for name in header if name not in COLUMNS]
    if "email" not in header or unknown:
        raise SuppressionFileError(
            f"header {','.join(header)[:200]!r}: columns must be among {','.join(COLUMNS)} and include "
            "email; fix the first line"
        )
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            report.lines += 1
            report.errors.append(f"line {line}: not readable as CSV ({error}); fix its quoting")
            continue
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        report.lines += 1
        try:
            if len(cells) != len(header):
                raise ValueError(
                    f"{len(cells)} cells where the header has {len(header)}; quote a cell that holds a comma"
                )
            yield parse_line(dict(zip(header, cells, strict=True)), default_reason, default_source)
        except ValueError as error:
            report.errors.append(f"line {line}: {error}")


def import_file(
    engine: Engine, path: Path, default_reason: str = "manual", source: str | None = None
) -> ImportReport:
    """Import a CSV file; every line is written or reported, a bad one never stops the rest."""
    report = ImportReport()
    default_source = source or f"import {path.name}"
    try:
        stream = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as error:
        raise SuppressionFileError(
            f"cannot read {path}: {error.strerror}; give a readable CSV file"
        ) from None
    with stream:
        part: list[Suppression] = []
        for item in read_suppressions(stream, report, default_reason, default_source):
            part.append(item)
            if len(part) >= IMPORT_PART:
                _write_part(engine, part, report)
                part = []
        _write_part(engine, part, report)
    return report


def _write_part(engine: Engine, part: list[Suppression], report: ImportReport) -> None:
    if not part:
        return
    with engine.begin() as conn:
        added = add_many(conn, part)
    report.added += added
    report.already_present += len(part) - added


def export_csv(engine: Engine, out: IO[str], **filters: Any) -> int:
    """Write the suppressions (``filters`` as :func:`~include.suppressions.store.listed`) as CSV."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    written = 0
    with engine.connect() as conn:
        for item in listed(conn, **filters):
            created = datetime.fromtimestamp(item.created_at or 0.0, UTC).isoformat().replace("+00:00", "Z")
            writer.writerow([item.email, item.campaign_id, item.reason, item.source or "", created])
            written += 1
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_parser = actions.add_parser("add", help="suppress addresses (for every campaign unless --campaign)")
    add_parser.add_argument("emails", nargs="+", metavar="EMAIL")
    add_parser.add_argument("--reason", choices=REASONS, default="manual")
    add_parser.add_argument("--source", default="cli", help="where it came from (a ticket, a person)")
    remove_parser = actions.add_parser("remove", help="undo a suppression (the only way one is undone)")
    remove_parser.add_argument("emails", nargs="+", metavar="EMAIL")
    for sub in (add_parser, remove_parser):
        sub.add_argument("--campaign", default="", help="one campaign's id; default: every campaign")
    list_parser = actions.add_parser("list", help="print suppressions as CSV")
    export_parser = actions.add_parser("export", help="write suppressions to a CSV file")
    export_parser.add_argument("--out", required=True, help="the CSV file to write ('-': standard output)")
    for sub in (list_parser, export_parser):
        sub.add_argument("--email")
        sub.add_argument("--campaign", default=None, help="one scope ('' : the every-campaign ones)")
        sub.add_argument("--reason", choices=REASONS)
    list_parser.add_argument("--limit", type=int, default=100)
    import_parser = actions.add_parser("import", help="add the suppressions of a CSV file")
    import_parser.add_argument("file", type=Path)
    import_parser.add_argument("--reason", choices=REASONS, default="manual", help="for lines without one")
    import_parser.add_argument(
        "--source", default=None, help="for lines without one (default: the file name)"
    )


def main(args: argparse.Namespace) -> int:
    """Run one action; 1 when an address or line was refused (the others are still written)."""
    from include.resources import open_resources

    with open_resources() as res:
        return _ACTIONS[args.action](res.engine, args)


def _add(engine: Engine, args: argparse.Namespace) -> int:
    report = ImportReport()
    items = []
    for number, email in enumerate(args.emails, start=1):
        report.lines += 1
        try:
            cells = {"email": email, "campaign_id": args.campaign, "reason": args.reason}
            items.append(parse_line(cells, args.reason, args.source))
        except ValueError as error:
            report.errors.append(f"address {number}: {error}")
    with engine.begin() as conn:
        report.added = add(conn, items)
    report.already_present = len(items) - report.added
    return _print_report(report)


def _remove(engine: Engine, args: argparse.Namespace) -> int:
    with engine.begin() as conn:
        removed = sum(remove(conn, email, args.campaign) for email in args.emails)
    print({"removed": removed, "not_found": len(args.emails) - removed})
    return 0


def _list(engine: Engine, args: argparse.Namespace) -> int:
    export_csv(
        engine, sys.stdout, email=args.email, campaign_id=args.campaign, reason=args.reason, limit=args.limit
    )
    return 0


def _export(engine: Engine, args: argparse.Namespace) -> int:
    filters = {"email": args.email, "campaign_id": args.campaign, "reason": args.reason}
    if args.out == "-":
        export_csv(engine, sys.stdout, **filters)
        return 0
    with open(args.out, "w", encoding="utf-8", newline="") as out:
        written = export_csv(engine, out, **filters)
    print({"exported": written, "file": args.out})
    return 0


def _import(engine: Engine, args: argparse.Namespace) -> int:
    return _print_report(import_file(engine, args.file, args.reason, args.source))


def _print_report(report: ImportReport) -> int:
    for error in report.errors[:MAX_REPORTED]:
        print(error, file=sys.stderr)
    if report.rejected > MAX_REPORTED:
        print(f"... and {report.rejected - MAX_REPORTED} more refused lines", file=sys.stderr)
    print(report.summary())
    return 1 if report.errors else 0


_ACTIONS = {"add": _add, "remove": _remove, "list": _list, "export": _export, "import": _import}
