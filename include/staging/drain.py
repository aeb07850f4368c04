"""Drain the journal into staging: fetch a page, stage it with its position, until 204 or the cap.

The next page is fetched in a background thread (from the position of the Link header) while
the current one is parsed, and batches of pages are written by a second thread while the next
ones download and parse: the network wait, the parsing and the database write overlap. The
position only moves when a page is stored, so a prefetched page that is never stored is simply
fetched again by the next drain.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from sqlalchemy import Engine

from include.adobe.auth import ImsAuthenticator
from include.adobe.journal import JournalClient, JournalDrained, JournalPage
from include.config import Settings, TriggersConfig, load_config
from include.database.engine import make_engine
from include.errors import JournalGoneError
from include.staging.parser import ParsedPage
from include.staging.stager import Stager

log = logging.getLogger(__name__)

# A transaction stores at least STAGE_BATCH_EVENTS events (with the last page's position), and
# the pages that arrive while the previous one is still being written, up to
# STAGE_BATCH_MAX_EVENTS: when the database is the bottleneck, fewer and larger commits (on
# SQLite, 5,000 -> 50,000 events per commit halves the write time: each commit rewrites the
# key index's pages it touched).
STAGE_BATCH_EVENTS = 5_000
STAGE_BATCH_MAX_EVENTS = 50_000


@dataclass
class DrainReport:
    """What one drain did. ``received``, ``quarantined`` and ``ignored`` count messages as the
    journal sent them, repeats included; ``staged`` counts the new rows."""

    pages: int = 0
    received: int = 0
    staged: int = 0
    duplicates: int = 0
    quarantined: int = 0
    ignored: int = 0
    retries: int = 0
    seconds: float = 0.0
    drained: bool = False  # the journal answered 204
    position: str | None = None
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def drain(
    engine: Engine,
    config: TriggersConfig,
    authenticator: ImsAuthenticator,
    *,
    max_events: int | None = None,
) -> DrainReport:
    """Stage every event after the stored position, until the journal answers 204 or
    ``max_events`` (default ``pipeline.max_events_per_run``) have been received."""
    settings = config.pipeline
    max_events = max_events or settings.max_events_per_run
    stager = Stager(engine, config)
    client = JournalClient(authenticator, settings.consumer, retry_validity=settings.retry_validity)
    host = urlsplit(authenticator.credentials.pipeline_url).netloc
    report = DrainReport()
    started = time.monotonic()
    position = stager.position()
    latest = position is None and settings.start_from == "latest"
    batch: list[ParsedPage] = []
    batch_events = 0
    writing: Future | None = None
    retries_staged = 0

    def stage(pages: list[ParsedPage]) -> None:
        nonlocal retries_staged
        merged = ParsedPage.merge(pages)
        result = stager.stage(merged, pipeline_host=host, fetched_at=time.time(),
                              retries=client.retries - retries_staged)
        retries_staged = client.retries
        report.staged += result.staged
        report.duplicates += result.duplicates

    def take(page: ParsedPage) -> None:
        """Count a parsed page and hand batches to the writer."""
        nonlocal position, writing, batch, batch_events
        report.pages += 1
        report.received += page.count
        report.quarantined += page.quarantined
        report.ignored += page.ignored
        for reason, count in page.reasons.items():
            report.quarantine_reasons[reason] = report.quarantine_reasons.get(reason, 0) + count
        position = page.last_position or position
        batch.append(page)
        batch_events += page.count
        writer_free = writing is None or writing.done()
        if (batch_events >= STAGE_BATCH_EVENTS and writer_free) or batch_events >= STAGE_BATCH_MAX_EVENTS:
            if writing:
                writing.result()
            writing, batch, batch_events = writer.submit(stage, batch), [], 0

    with ThreadPoolExecutor(1, "journal-prefetch") as prefetcher, ThreadPoolExecutor(1, "staging") as writer:
        fetching: Future | None = None
        requested = 0
        while max_events is None or requested < max_events:
            limit = settings.fetch_size if max_events is None else min(settings.fetch_size, max_events - requested)
            answer = fetching.result() if fetching else _fetch(client, position, limit, latest, stager, settings.on_gone)
            fetching = None
            if isinstance(answer, JournalDrained):
                report.drained = True
                if latest and answer.next_position:  # where the journal ends: the next drain goes on from there
                    end = stager.parser.parse_items([], time.time())
                    end.last_position = position = answer.next_position
                    stage([end])
                break
            latest = False
            requested += limit
            if answer.next_position and (max_events is None or requested < max_events):
                fetching = prefetcher.submit(client.fetch, answer.next_position, limit)
            page = stager.parser.parse_page(answer.body, time.time())
            take(page)
            if not page.count:
                break
        if fetching is not None:
            fetching.cancel()
        if writing:
            writing.result()
        if batch:
            stage(batch)
    report.position = position
    report.seconds = round(time.monotonic() - started, 3)
    log.info("drained %s", {k: v for k, v in report.as_dict().items() if k != "quarantine_reasons"})
    return report


def _fetch(client: JournalClient, position: str | None, limit: int, latest: bool, stager: Stager,
           on_gone: str) -> JournalPage | JournalDrained:
    try:
        return client.fetch(position, limit, latest=latest)
    except JournalGoneError as error:
        if on_gone != "restart_from_oldest":
            raise JournalGoneError(
                f"{error}. Events after it have expired from the journal. To accept the loss and go on, set "
                "pipeline.on_gone: restart_from_oldest"
            ) from None
        log.error("%s; restarting from the oldest retained event (pipeline.on_gone). Every event published "
                  "between the stored position and the oldest retained one is lost", error)
        stager.reset_position()
        return client.fetch(None, limit)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-events", type=int, help="stop after this many events (default: until 204)")


def main(args: argparse.Namespace) -> int:
    """Drain once with the `adobe_pipeline` connection (AIRFLOW_CONN_ADOBE_PIPELINE)."""
    from include.adobe.hook import AdobePipelineHook

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    config = load_config(settings.config_path, settings.templates_dir)
    authenticator = AdobePipelineHook().get_conn()
    report = drain(make_engine(settings.db_url), config, authenticator, max_events=args.max_events)
    print(report.as_dict())
    return 0

