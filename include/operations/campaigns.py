"""``python -m include.cli campaigns list|cancel``: each campaign's state and waiting emails, and the
explicit cancel of a switched-off or removed campaign's pending emails (SPEC section 9)."""

from __future__ import annotations

import argparse
import json

from include.delivery.controls import CANCELLED, cancel_pending, waiting_by_campaign


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="each campaign's state (enabled, disabled, removed) and pending emails")
    cancel = actions.add_parser(
        "cancel",
        help=f"suppress ({CANCELLED}) the pending emails of a disabled or removed campaign",
        description=cancel_pending.__doc__,
    )
    cancel.add_argument("--campaign", required=True, help="the campaign id")


def main(args: argparse.Namespace) -> int:
    from include.resources import open_resources

    with open_resources() as res:
        if args.action == "cancel":
            number = cancel_pending(res.engine, res.config, args.campaign)
            print(f"{args.campaign}: {number} pending email(s) suppressed as {CANCELLED}")
            return 0
        with res.engine.connect() as conn:
            print(json.dumps(waiting_by_campaign(conn, res.config), indent=2))
    return 0
