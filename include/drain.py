"""Drain the journal into staging: fetch a page, stage it with its position, until 204 or the cap.

The next page is fetched in a background thread while the current one is parsed and stored:
the network wait overlaps the database write. The position only moves when a page is stored,
so a prefetched page that is never stored is simply fetched again by the next drain.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from types import ModuleType
from urllib.parse import urlsplit

from sqlalchemy import Engine

from include.auth import ImsAuthenticator
from include.config import Settings, TriggersConfig, load_config
from include.db import make_engine
from include.errors import JournalGoneError
from include.events import EventParser, ParsedPage, parse_page_in_process, start_parser_process
from include.journal import JournalClient, JournalDrained, JournalPage
from include.staging import Stager

log = logging.getLogger(__name__)

# pages are written in transactions of about this many events (with the last page's position)
STAGE_BATCH_EVENTS = 5000
PAGES_IN_FLIGHT = 2  # fetched pages being parsed ahead of the one being counted
PARSE_PROCESS_AFTER_PAGES = 20  # a backlog this long pays for starting a parsing process (~1 s)


class _PageParser:
    """Parses pages in this thread, then in a second process once the backlog proves large."""

    def __init__(self, config: TriggersConfig, local: EventParser) -> None:
        self.config, self.local = config, local
        self.pool: ProcessPoolExecutor | None = None
        self.process_failed = False
        self.pages = 0

    def submit(self, body: bytes) -> Future:
        self.pages += 1
        received_at = time.time()
        if self.pool is None and self.pages > PARSE_PROCESS_AFTER_PAGES:  # started once
            self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"),
                                            initializer=start_parser_process, initargs=(self.config,))
        future: Future = Future()
        if self.pool is not None and not self.process_failed:
            # the worker needs nothing of the caller's script: hide it so that spawning does not
            # run it again (the first submit starts the process)
            caller_main = sys.modules["__main__"]
            sys.modules["__main__"] = ModuleType("__main__")
            try:
                remote = self.pool.submit(parse_page_in_process, body, received_at)
            finally:
                sys.modules["__main__"] = caller_main
            remote.add_done_callback(lambda done: self._settle(future, done, body, received_at))
            return future
        self._parse_here(future, body, received_at)
        return future

    def _settle(self, future: Future, done: Future, body: bytes, received_at: float) -> None:
        if isinstance(done.exception(), BrokenProcessPool):  # the process died: go on without it
            log.warning("the parsing process stopped; parsing in the drain's own process")
            self.process_failed = True
            self._parse_here(future, body, received_at)
        elif done.exception() is not None:
            future.set_exception(done.exception())
        else:
            future.set_result(done.result())

    def _parse_here(self, future: Future, body: bytes, received_at: float) -> None:
        try:
            future.set_result(self.local.parse_page(body, received_at))
        except Exception as error:  # raised where the page is taken, as from the process
            future.set_exception(error)

    def __enter__(self) -> _PageParser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


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
        """Count a parsed page and hand full batches to the writer."""
        nonlocal position, writing, batch
        report.pages += 1
        report.received += page.count
        report.quarantined += page.quarantined
        report.ignored += page.ignored
        for reason, count in page.reasons.items():
            report.quarantine_reasons[reason] = report.quarantine_reasons.get(reason, 0) + count
        position = page.last_position or position
        batch.append(page)
        if sum(p.count for p in batch) >= STAGE_BATCH_EVENTS:
            if writing:
                writing.result()
            writing, batch = writer.submit(stage, batch), []

    # Four stages overlap: the next page downloads (from the position of the Link header), pages
    # are parsed (in a second process once the backlog is large: parsing holds the GIL), and the
    # previous batch is written (the database calls release the GIL).
    writing: Future | None = None
    with ThreadPoolExecutor(1, "journal-prefetch") as prefetcher, ThreadPoolExecutor(1, "staging") as writer, \
            _PageParser(config, stager.parser) as parser:
        fetching: Future | None = None
        parsing: deque[Future] = deque()
        requested = 0
        empty_page = False
        while not empty_page and (max_events is None or requested < max_events):
            limit = settings.fetch_size if max_events is None else min(settings.fetch_size, max_events - requested)
            answer = fetching.result() if fetching else _fetch(client, position, limit, latest, stager, settings.on_gone)
            fetching, latest = None, False
            if isinstance(answer, JournalDrained):
                report.drained = True
                break
            requested += limit
            if answer.next_position and (max_events is None or requested < max_events):
                fetching = prefetcher.submit(client.fetch, answer.next_position, limit)
            parsing.append(parser.submit(answer.body))
            # without a Link to follow, settle every page to learn the position to ask for
            while parsing and (len(parsing) > PAGES_IN_FLIGHT or fetching is None):
                page = parsing.popleft().result()
                take(page)
                empty_page = empty_page or not page.count
        for future in parsing:
            take(future.result())
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
    from include.hooks import AdobePipelineHook

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    config = load_config(settings.config_path, settings.templates_dir)
    authenticator = AdobePipelineHook().get_conn()
    report = drain(make_engine(settings.db_url), config, authenticator, max_events=args.max_events)
    print(report.as_dict())
    return 0

