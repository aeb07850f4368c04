"""``python -m include.cli preview``: exactly what delivery would send for one decision.

The message is rendered by delivery's own row renderer (:func:`include.delivery.run.delivery_renderer`,
:meth:`~include.delivery.render_pool.RowRenderer.render_row`) from the row delivery would read:
the recipient as it is now, and the staged event (``--event``), else the event of the
recipient's latest decision for the campaign, else a sample event (``--sample``) built from the
campaign's trigger and ``where`` conditions. Only the ``Date`` header and the unsubscribe
token (it carries the second it was issued at) differ from the sent message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqlalchemy import Engine

from include.config import TriggersConfig
from include.delivery.run import delivery_renderer
from include.previews.rows import campaign_of, event_for, preview_row, recipient_of, render_one


def preview_message(
    engine: Engine,
    config: TriggersConfig,
    templates_dir: str | Path,
    campaign_id: str,
    *,
    recipient_id: str | None = None,
    email: str | None = None,
    event_id: str | None = None,
    sample: bool = False,
    now: float | None = None,
) -> tuple[bytes, str]:
    """The message bytes (CRLF) delivery would send, and which event it was built from."""
    campaign = campaign_of(config, campaign_id)
    with engine.connect() as conn:
        recipient = recipient_of(conn, recipient_id, email)
        event, source = event_for(
            conn, config, campaign, recipient, event_id, time.time() if now is None else now, sample
        )
    renderer = delivery_renderer(engine, config, templates_dir).row_renderer
    return render_one(renderer, preview_row(campaign.id, recipient, event)).data, source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", required=True, help="the campaign id")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--recipient", help="a recipient_id of the recipients table")
    who.add_argument("--email", help="a recipient's address")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--event", help="a staged event id (default: the recipient's latest decided event)")
    what.add_argument("--sample", action="store_true", help="a sample event of the campaign's trigger")
    parser.add_argument("--out", type=Path, help="write the message to this .eml file instead of printing it")


def main(args: argparse.Namespace) -> int:
    from include.resources import open_resources

    with open_resources() as res:
        data, source = preview_message(
            res.engine,
            res.config,
            res.settings.templates_dir,
            args.campaign,
            recipient_id=args.recipient,
            email=args.email,
            event_id=args.event,
            sample=args.sample,
        )
    if args.out:
        args.out.write_bytes(data)
        print(f"{args.out}: {len(data)} bytes, from {source}", file=sys.stderr)
    else:
        print(f"(from {source})", file=sys.stderr)
        sys.stdout.write(data.decode("utf-8").replace("\r\n", "\n"))
    return 0
