"""``python -m include.cli audience``: ``load`` from a CSV file or a query, ``sync`` from a query.

``audience load PATH`` and ``audience load --conn-id CONN --sql QUERY`` (or ``--sql-file FILE``)
upsert with the same validation and reasons; ``audience sync`` also removes the recipients the
query no longer returns, as the ``audience_sync`` DAG does (see ``include.audience.source``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from include.audience import source
from include.audience.load import load_recipients
from include.errors import AudienceError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    load = actions.add_parser(
        "load",
        help="upsert recipients from a CSV file, or from a query through an Airflow connection",
        description=f"{load_recipients.__doc__}\n\nWith --conn-id: upsert what a query returns instead "
        "(its columns named as the CSV header; rows rejected with the same reasons).",
    )
    load.add_argument(
        "path", type=Path, nargs="?", help="CSV with the header recipient_id,email,first_name,..."
    )
    _source_arguments(load)
    sync = actions.add_parser(
        "sync",
        help="upsert from a query and remove the recipients it no longer returns (what audience_sync does)",
        description="Upsert from a query, then remove the recipients it no longer returns; suppressions "
        "and deliveries are kept. Refused when the source returns nothing or the removals exceed "
        "--max-removed-share of the recipients, unless --force.",
    )
    _source_arguments(sync)
    sync.add_argument(
        "--max-removed-share",
        type=float,
        default=None,
        help="refuse to remove more than this share of the recipients (default "
        "TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE, else 0.1)",
    )
    sync.add_argument("--force", action="store_true", help="remove whatever the source no longer has")


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conn-id", help="an Airflow connection to a SQL database (postgres, mysql...)")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--sql", help="the query; its columns are named as the CSV header")
    query.add_argument("--sql-file", type=Path, help="a file holding the query")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows per chunk (default 100000 from CSV, 50000 from SQL)",
    )


def main(args: argparse.Namespace) -> int:
    from include.resources import open_resources

    path = getattr(args, "path", None)
    if (path is None) == (args.conn_id is None):
        raise AudienceError("give either a CSV file or --conn-id with --sql or --sql-file")
    if args.conn_id is None:
        with open_resources() as res:
            report = load_recipients(res.engine, path, chunk_size=args.chunk_size or 100_000)
        _print_report(str(path), report)
        return 0
    if args.sql is None and args.sql_file is None:
        raise AudienceError(f"--conn-id {args.conn_id} needs --sql QUERY or --sql-file FILE")
    sql = source.read_sql_file(args.sql_file) if args.sql_file else args.sql
    chunk_size = args.chunk_size or source.DEFAULT_CHUNK_SIZE
    with open_resources() as res:
        if args.action == "load":
            report = source.load_recipients_from_sql(res.engine, args.conn_id, sql, chunk_size=chunk_size)
        else:
            share = args.max_removed_share
            report = source.sync_recipients(
                res.engine,
                args.conn_id,
                sql,
                chunk_size=chunk_size,
                max_removed_share=source.max_removed_share_setting() if share is None else share,
                force=args.force,
            )
    _print_report(f"query on {args.conn_id}", report)
    return 0


def _print_report(origin: str, report: dict[str, Any]) -> None:
    print(
        f"{origin}: {report['loaded']} loaded ({report['inserted']} new, {report['updated']} updated), "
        f"{report['rejected']} rejected" + (f", {report['removed']} removed" if "removed" in report else "")
    )
    for reason, number in sorted(report["reasons"].items()):
        print(f"  rejected {number}: {reason}")
    for example in report["examples"]:
        print(f"    {example}")
    if report["invalid_email"]:
        print(
            f"  {report['invalid_email']} loaded with an invalid email: they will be suppressed as invalid_email"
        )
