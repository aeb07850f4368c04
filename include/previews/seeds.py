"""Seed addresses (``seeds:`` of a campaign): after each delivery run, every seed gets a proof copy
of the first email the campaign sent in that run, as :mod:`include.previews.send_test` makes
proofs (rendered for the seed's address, ``[TEST]`` subject, never recorded). The DAG's deliver
task sends them; a seed that cannot be reached is logged and counted, the run goes on."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, text

from include.config import TriggersConfig
from include.delivery.render import normalize_email
from include.delivery.run import delivery_renderer
from include.delivery.smtp import SmtpSettings
from include.errors import TriggersError
from include.previews.rows import decision_rows
from include.previews.send_test import proof_of, send_proof

log = logging.getLogger(__name__)


def send_seed_copies(
    engine: Engine, config: TriggersConfig, templates_dir: str | Path, smtp: SmtpSettings, since: float
) -> dict[str, int]:
    """For each campaign with seeds and an email sent at ``since`` or later (this run): a proof
    of its first one to each seed. Counts: seed_copies, seed_copies_failed."""
    counts = {"seed_copies": 0, "seed_copies_failed": 0}
    campaigns = [c for c in config.campaigns if c.seeds]
    if not campaigns:
        return {}
    renderer = delivery_renderer(engine, config, templates_dir).row_renderer
    with engine.connect() as conn:
        for campaign in campaigns:
            first = pd.read_sql(
                text(
                    "SELECT campaign_id, recipient_id, email, event_id, event_time FROM deliveries "
                    "WHERE campaign_id = :c AND status = 'sent' AND sent_at >= :since "
                    "ORDER BY sent_at, delivery_id LIMIT 1"
                ),
                conn,
                params={"c": campaign.id, "since": since},
            )
            for row in decision_rows(conn, first):
                for seed in campaign.seeds:
                    try:
                        send_proof(smtp, proof_of(renderer, row, normalize_email(seed), kind="seed"))
                        counts["seed_copies"] += 1
                    except (TriggersError, OSError) as error:
                        counts["seed_copies_failed"] += 1
                        log.warning("seed copy of %s to %s not sent: %s", campaign.id, seed, error)
    return {key: value for key, value in counts.items() if value}
