"""``python -m include.cli send-test``: a proof of a campaign's email, sent through ``smtp_default``.

The proof is what delivery would send (:mod:`include.previews.preview`'s row, delivery's renderer)
for the recipient given (else a blank sample recipient) with three differences: it goes to the
``--to`` address (envelope and ``To``, so its unsubscribe link can only unsubscribe that address),
its subject starts with ``[TEST] `` and it carries ``X-Triggers-Proof: yes``, and its
``Message-ID`` is not the real delivery's. Nothing is written to ``deliveries`` or counted.
"""

from __future__ import annotations

import argparse
import smtplib
import time
from pathlib import Path

from sqlalchemy import Engine

from include.config import TriggersConfig
from include.delivery.render import RenderedEmail, normalize_email
from include.delivery.render_pool import RECIPIENT_COLUMNS, Row, RowRenderer
from include.delivery.run import delivery_renderer
from include.delivery.smtp import SmtpSettings, open_client, reply_text
from include.errors import InvalidEmailError, PreviewError, SmtpUnavailableError
from include.previews.rows import campaign_of, event_for, preview_row, recipient_of, render_one

PROOF_SUBJECT = b"[TEST] "
PROOF_HEADER = b"X-Triggers-Proof: yes\r\n"


def mark_proof(data: bytes) -> bytes:
    """``[TEST] `` before the subject, and the proof header after it."""
    head, separator, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for index, line in enumerate(lines):
        if line.startswith(b"Subject: "):
            lines[index] = b"Subject: " + PROOF_SUBJECT + line[len(b"Subject: ") :]
            end = index + 1
            while end < len(lines) and lines[end][:1] in (b" ", b"\t"):  # a folded subject goes on
                end += 1
            lines.insert(end, PROOF_HEADER.rstrip(b"\r\n"))
            break
    return b"\r\n".join(lines) + separator + body


def proof_message(
    engine: Engine,
    config: TriggersConfig,
    templates_dir: str | Path,
    campaign_id: str,
    to: str,
    *,
    recipient_id: str | None = None,
    event_id: str | None = None,
) -> RenderedEmail:
    """The proof for ``to``: rendered as delivery renders, marked as a proof."""
    try:
        address = normalize_email(to)
    except InvalidEmailError as error:
        raise PreviewError(f"--to {to!r}: {error}; give one plain address, e.g. seed@example.com") from None
    campaign = campaign_of(config, campaign_id)
    with engine.connect() as conn:
        if recipient_id is not None:
            recipient = recipient_of(conn, recipient_id)
        else:  # a blank recipient: the template's defaults for missing values show
            recipient = {**dict.fromkeys(RECIPIENT_COLUMNS), "recipient_id": "proof", "email": address}
        event, _ = event_for(conn, config, campaign, recipient, event_id, time.time())
    row = preview_row(campaign.id, recipient, event)
    return proof_of(delivery_renderer(engine, config, templates_dir).row_renderer, row, address)


def proof_of(renderer: RowRenderer, row: Row, address: str, kind: str = "proof") -> RenderedEmail:
    """``row``'s email as a proof for ``address`` (already normalized): rendered for that address
    (so its unsubscribe link can only unsubscribe it) under an id of its own, then marked."""
    proof_row = {
        **row,
        "email": address,
        "delivery_id": f"{kind}-{int(time.time() * 1000)}-{row['delivery_id'][:12]}",
    }
    rendered = render_one(renderer, proof_row)
    return RenderedEmail(rendered.envelope_from, address, mark_proof(rendered.data), rendered.message_id)


def send_proof(smtp: SmtpSettings, message: RenderedEmail) -> str:
    """Send through the relay; its reply. Not recorded anywhere."""
    envelope_from = normalize_email(smtp.from_email) if smtp.from_email else message.envelope_from
    try:
        client = open_client(smtp)
    except OSError as error:
        raise SmtpUnavailableError(
            f"cannot reach the SMTP relay {smtp.address} ({error}); check the smtp_default connection"
        ) from None
    try:
        refused = client.sendmail(envelope_from, [message.envelope_to], message.data)
        if refused:
            code, reply = next(iter(refused.values()))
            raise PreviewError(f"the relay refused {message.envelope_to}: {reply_text(code, reply)}")
        return "250 accepted"
    except smtplib.SMTPResponseException as error:
        raise SmtpUnavailableError(
            f"the relay {smtp.address} refused the proof: {reply_text(error.smtp_code, error.smtp_error)}"
        ) from None
    except smtplib.SMTPRecipientsRefused as error:
        code, reply = next(iter(error.recipients.values()))
        raise PreviewError(f"the relay refused {message.envelope_to}: {reply_text(code, reply)}") from None
    except OSError as error:  # smtplib.SMTPException is one: a dropped connection, a timeout
        raise SmtpUnavailableError(
            f"the relay {smtp.address} dropped the proof ({type(error).__name__}: {error}); "
            "check the smtp_default connection and send it again"
        ) from None
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", required=True, help="the campaign id")
    parser.add_argument("--to", required=True, help="where the proof goes, e.g. seed@example.com")
    parser.add_argument("--recipient", help="render it for this recipient_id (default: a blank recipient)")
    parser.add_argument("--event", help="a staged event id (default: the latest decided, else a sample)")


def main(args: argparse.Namespace) -> int:
    from include.delivery.hook import PipeliningSmtpHook
    from include.resources import open_resources

    with open_resources() as res:
        message = proof_message(
            res.engine,
            res.config,
            res.settings.templates_dir,
            args.campaign,
            args.to,
            recipient_id=args.recipient,
            event_id=args.event,
        )
        smtp = PipeliningSmtpHook(res.settings.smtp_conn_id).session_settings()
    reply = send_proof(smtp, message)
    print(f"proof of {args.campaign} sent to {message.envelope_to} ({reply}); not recorded as a delivery")
    return 0
