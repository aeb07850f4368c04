"""Drain the journal into staging: fetch a page, stage it with its position, until 204 or the cap.

The next page is fetched in a background thread (from the position of the Link header) while
the current one is parsed, and batches of pages are written by a second thread while the next
ones download and parse: the network wait, the parsing and the database write overlap. The
position only moves when a page is stored, so a prefetched page that is never stored is simply
fetched again by the next drain. A drain holds the database's "drain" run lock for its whole
work, so drains that overlap take turns.

A page whose structure cannot be read stops the drain at its position (the pages before it are
stored); ``drain --skip-unreadable-page`` stores its raw body as one quarantined row and goes on
from the page's next position (its Link header, or its ``_page.last``).
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
from include.database.locks import run_lock
from include.errors import ConfigError, JournalGoneError, UnreadablePageError
from include.runtime import progress_logged
from include.staging.parser import ParsedPage
from include.staging.salvage import last_position_of
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
SKIP_COMMAND = "python -m include.cli drain --skip-unreadable-page"


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
    refused: int = 0  # rows the database refused, stored quarantined with its message
    skipped_pages: int = 0  # unreadable pages stored as one quarantined row (--skip-unreadable-page)
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
    skip_unreadable_page: bool = False,
) -> DrainReport:
    """Stage every event after the stored position, until the journal answers 204 or
    ``max_events`` (default ``pipeline.max_events_per_run``) have been received. ``client``
    reads the configuration's consumer (``AdobePipelineHook.for_config(config).get_conn()``).
    ``skip_unreadable_page``: quarantine the first page whose structure cannot be read and go on."""
    return JournalDrain(
        engine, config, client, max_events=max_events, skip_unreadable_page=skip_unreadable_page
    ).run()


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
        self.report.refused += result.refused
        self.report.quarantined += result.refused

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _wait(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None


class JournalDrain:
    """One drain of the configuration's consumer into staging; ``run()`` once."""

    def __init__(
        self,
        engine: Engine,
        config: TriggersConfig,
        client: JournalClient,
        *,
        max_events: int | None = None,
        skip_unreadable_page: bool = False,
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
        self.skips_left = 1 if skip_unreadable_page else 0

    def run(self) -> DrainReport:
        started = time.monotonic()
        retries_before = self.client.retries
        try:
            with (
                run_lock(self.stager.engine, "drain"),
                progress_logged(log, "drain", "events", lambda: self.report.received, self._remaining),
            ):
                self.position = self.stager.position()  # read under the lock: where the last drain ended
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
            page = self._parse(answer)
            self.report.count(page)
            self.position = page.last_position or self.position
            self.writer.add(page)
            if not page.count:
                return

    def _parse(self, answer: JournalPage) -> ParsedPage:
        """The page's rows; an unreadable page stops the drain (after storing the pages before
        it), or with a skip left becomes one quarantined row at its next position."""
        try:
            return self.stager.parser.parse_page(answer.body, time.time())
        except UnreadablePageError as error:
            next_position = answer.next_position or last_position_of(answer.body)
            if self.skips_left and next_position:
                self.skips_left -= 1
                self.report.skipped_pages += 1
                log.error("skipping the unreadable page after position %r (%s)", self.position, error)
                reason = f"unreadable journal page ({error})"[:1000]
                return self.stager.parser.unreadable_page(answer.body, reason, next_position, time.time())
            self.prefetch.cancel()
            self.writer.finish()
            fix = (
                f"to store its raw body as one quarantined row and go on: {SKIP_COMMAND}"
                if next_position
                else "it names no next position (no Link header, no _page.last), so it cannot be skipped"
            )
            raise UnreadablePageError(
                f"the journal page after position {self.position!r} cannot be read: {error}. The drain "
                f"stops there (the pages before it are staged); {fix}"
            ) from None

    def _remaining(self) -> int | None:
        """Events left before the cap; None without one (the journal does not say how many wait)."""
        return None if self.max_events is None else self.max_events - self.report.received

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
    parser.add_argument(
        "--skip-unreadable-page",
        action="store_true",
        help="store the first journal page whose structure cannot be read as one quarantined row "
        "(its raw body) and go on from its next position",
    )


def main(args: argparse.Namespace) -> int:
    """Drain once with the `adobe_pipeline` connection (AIRFLOW_CONN_ADOBE_PIPELINE)."""
    from include.adobe.hook import AdobePipelineHook  # imports Airflow: only for this command
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with (
        open_resources() as res,
        AdobePipelineHook.for_config(res.config, res.settings.pipeline_conn_id) as hook,
    ):
        report = drain(
            res.engine,
            res.config,
            hook.get_conn(),
            max_events=args.max_events,
            skip_unreadable_page=args.skip_unreadable_page,
        )
    print(report.as_dict())
    return 0
