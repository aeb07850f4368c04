"""The project's command line: ``python -m include.cli COMMAND ...`` (``./run cli COMMAND ...``).

Each command lives in the module that owns its logic; this file only lists them. A module named
here provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from include.errors import TriggersError

COMMANDS = {
    # name: (module, one-line help)
    "simulator": ("include.sandbox.simulator.cli", "run the local Adobe pipeline simulator (IMS + journal)"),
    "keys": ("include.sandbox.keys", "create an RSA key pair and a matching adobe_pipeline connection"),
    "drain": ("include.staging.drain", "authenticate and drain the pipeline journal into staging once"),
    "deliver": ("include.delivery.run", "send the pending emails once through smtp_default"),
    "import": ("include.staging.imports", "stage a JSON-lines export of past events, for a backfill"),
    "demo": ("include.sandbox.demo", "run the whole job once on embedded defaults and show what it did"),
    "status": (
        "include.operations.status",
        "print the pipeline status (what the Airflow status view shows) as JSON",
    ),
    "audience": (
        "include.audience.commands",
        "load the recipients table from CSV or a database query, or sync it with the query",
    ),
    "suppressions": (
        "include.suppressions.commands",
        "add, remove, list, import or export suppressed addresses (CSV)",
    ),
    "unsubscribe": ("include.suppressions.server", "serve the one-click unsubscribe endpoint (RFC 8058)"),
    "db": (
        "include.operations.database",
        "upgrade the staging database's schema (db upgrade) or check it (db check)",
    ),
    "purge": ("include.operations.purge", "delete staged events and deliveries older than their retention"),
    "bounces": (
        "include.bounces.mailbox",
        "read bounces, complaints and mailto unsubscribes from the imap_default mailbox (bounces read)",
    ),
    "preview": ("include.previews.preview", "print or write (.eml) what a campaign would send someone"),
    "send-test": ("include.previews.send_test", "send a proof ([TEST] subject) that is never recorded"),
    "dry-run": ("include.previews.dry_run", "what a run would send and suppress, and why; writes nothing"),
    "campaigns": ("include.operations.campaigns", "campaigns' states and waiting emails; cancel them"),
    "smtp": (
        "include.sandbox.smtp_server",
        "run a local SMTP server that keeps what it receives (demo, tests)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (each may pull in pandas or Airflow)."""
    parser = argparse.ArgumentParser(prog="python -m include.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    try:
        return importlib.import_module(args.module).main(args)
    except TriggersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
