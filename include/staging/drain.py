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

from include.adobe.journal import JournalClient, JournalDrained, JournalPage
from include.config import TriggersConfig
from include.errors import ConfigError, JournalGoneError
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

JournalAnswer = JournalPage | JournalDrained


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

    def count(self, page: ParsedPage) -> None:
        """Add a parsed page's messages."""
        self.pages += 1
        self.received += page.count
        self.quarantined += page.quarantined
        self.ignored += page.ignored
        for reason, number in page.reasons.items():
            self.quarantine_reasons[reason] = self.quarantine_reasons.get(reason, 0) + number

    def as_dict(self) -> dict:
        return asdict(self)


def drain(
    engine: Engine,
    config: TriggersConfig,
    client: JournalClient,
    *,
    max_events: int | None = None,
) -> DrainReport:
    """Stage every event after the stored position, until the journal answers 204 or
    ``max_events`` (default ``pipeline.max_events_per_run``) have been received. ``client``
    reads the configuration's consumer (``AdobePipelineHook.for_config(config).get_conn()``)."""
    return JournalDrain(engine, config, client, max_events=max_events).run()


class _Prefetcher:
    """The next page, requested in a background thread while the current one is parsed."""

    def __init__(self, client: JournalClient) -> None:
        self.client = client
        self._thread = ThreadPoolExecutor(1, "journal-prefetch")
        self._pending: Future[JournalAnswer] | None = None

    def start(self, position: str, limit: int) -> None:
        self._pending = self._thread.submit(self.client.fetch, position, limit)

    def take(self) -> JournalAnswer | None:
        """The answer of the request started last (waiting for it), or None if none is."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def cancel(self) -> None:
        """Drop the request if it has not started; one under way ends unused (never stored)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def close(self) -> None:
        self.cancel()
        self._thread.shutdown(wait=True)


class _Writer:
    """Stores parsed pages a batch per transaction, in a background thread (STAGE_BATCH_*)."""

    def __init__(self, stager: Stager, client: JournalClient, report: DrainReport) -> None:
        self.stager = stager
        self.client = client
        self.report = report
        self.host = urlsplit(client.credentials.pipeline_url).netloc
        self._thread = ThreadPoolExecutor(1, "staging")
        self._writing: Future[None] | None = None
        self._batch: list[ParsedPage] = []
        self._batch_events = 0
        self._retries_staged = client.retries

    def add(self, page: ParsedPage) -> None:
        """Queue a page; hand the batch to the thread once large enough and the thread is free,
        or once at the cap (then wait for the thread)."""
        self._batch.append(page)
        self._batch_events += page.count
        thread_free = self._writing is None or self._writing.done()
        if (
            self._batch_events >= STAGE_BATCH_EVENTS and thread_free
        ) or self._batch_events >= STAGE_BATCH_MAX_EVENTS:
            self._wait()
            self._writing = self._thread.submit(self.stage, self._batch)
            self._batch, self._batch_events = [], 0

    def finish(self) -> None:
        """Wait for the write under way, then store the rest in this thread."""
        self._wait()
        if self._batch:
            self.stage(self._batch)
            self._batch, self._batch_events = [], 0

    def stage(self, pages: list[ParsedPage]) -> None:
        """One transaction: the pages' events and the last one's position."""
        retries = self.client.retries
        result = self.stager.stage(
            ParsedPage.merge(pages),
            pipeline_host=self.host,
            fetched_at=time.time(),
            retries=retries - self._retries_staged,
        )
        self._retries_staged = retries
        self.report.staged += result.staged
        self.report.duplicates += result.duplicates

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _wait(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None


class JournalDrain:
    """One drain of the configuration's consumer into staging; ``run()`` once."""

    def __init__(
        self, engine: Engine, config: TriggersConfig, client: JournalClient, *, max_events: int | None = None
    ) -> None:
        self.settings = config.pipeline
        if client.consumer != self.settings.consumer:
            raise ConfigError(
                f"the journal client reads consumer {client.consumer!r}, the configuration's pipeline.consumer "
                f"is {self.settings.consumer!r}: make it with AdobePipelineHook.for_config(config)"
            )
        self.client = client
        self.stager = Stager(engine, config)
        self.max_events = max_events or self.settings.max_events_per_run
        self.report = DrainReport()
        self.prefetch = _Prefetcher(client)
        self.writer = _Writer(self.stager, client, self.report)
        self.position: str | None = None
        self.requested = 0  # events asked for, prefetched pages included

    def run(self) -> DrainReport:
        started = time.monotonic()
        retries_before = self.client.retries
        self.position = self.stager.position()
        try:
            self._read_pages(latest=self.position is None and self.settings.start_from == "latest")
            self.prefetch.cancel()
            self.writer.finish()
        finally:
            self.prefetch.close()
            self.writer.close()
        report = self.report
        report.position = self.position
        report.retries = self.client.retries - retries_before
        report.seconds = round(time.monotonic() - started, 3)
        log.info("drained %s", {k: v for k, v in report.as_dict().items() if k != "quarantine_reasons"})
        return report

    def _read_pages(self, latest: bool) -> None:
        """Fetch, parse and queue pages until 204, an empty page or the cap."""
        while not self._cap_reached():
            limit = self._next_limit()
            answer = self.prefetch.take()
            if answer is None:
                answer = self._fetch(limit, latest)
            if isinstance(answer, JournalDrained):
                self._journal_drained(answer, latest)
                return
            latest = False
            self.requested += limit
            if answer.next_position and not self._cap_reached():
                self.prefetch.start(answer.next_position, self._next_limit())
            page = self.stager.parser.parse_page(answer.body, time.time())
            self.report.count(page)
            self.position = page.last_position or self.position
            self.writer.add(page)
            if not page.count:
                return

    def _cap_reached(self) -> bool:
        return self.max_events is not None and self.requested >= self.max_events

    def _next_limit(self) -> int:
        if self.max_events is None:
            return self.settings.fetch_size
        return min(self.settings.fetch_size, self.max_events - self.requested)

    def _journal_drained(self, answer: JournalDrained, latest: bool) -> None:
        self.report.drained = True
        if latest and answer.next_position:  # where the journal ends: the next drain goes on from there
            end = self.stager.parser.parse_items([], time.time())
            end.last_position = self.position = answer.next_position
            self.writer.stage([end])

    def _fetch(self, limit: int, latest: bool) -> JournalAnswer:
        try:
            return self.client.fetch(self.position, limit, latest=latest)
        except JournalGoneError as error:
            if self.settings.on_gone != "restart_from_oldest":
                raise JournalGoneError(
                    f"{error}. Events after it have expired from the journal. To accept the loss and go on, "
                    "set pipeline.on_gone: restart_from_oldest"
                ) from None
            log.error(
                "%s; restarting from the oldest retained event (pipeline.on_gone). Every event published "
                "between the stored position and the oldest retained one is lost",
                error,
            )
            self.stager.reset_position()
            return self.client.fetch(None, limit)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-events", type=int, help="stop after this many events (default: until 204)")


def main(args: argparse.Namespace) -> int:
    """Drain once with the `adobe_pipeline` connection (AIRFLOW_CONN_ADOBE_PIPELINE)."""
    from include.adobe.hook import AdobePipelineHook  # imports Airflow: only for this command
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with (
        open_resources() as res,
        AdobePipelineHook.for_config(res.config, res.settings.pipeline_conn_id) as hook,
    ):
        report = drain(res.engine, res.config, hook.get_conn(), max_events=args.max_events)
    print(report.as_dict())
    return 0
