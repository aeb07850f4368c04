"""Rendering delivery rows into messages, in this process or in render processes.

Rendering is CPU-bound: a large run renders in separate processes, off the sending process's
GIL, part by part so that the first part is sent while the next renders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from include.database.schema import recipients
from include.delivery.render import RenderedEmail, Renderer, event_context, unsubscribe_url_for
from include.errors import InvalidEmailError, TemplateRenderError
from include.runtime import spawn_pool
from include.staging.parser import dimension_values
from include.suppressions.unsubscribe import make_token

log = logging.getLogger(__name__)

RECIPIENT_COLUMNS = tuple(c.name for c in recipients.columns)
RENDER_POOL_MIN_ROWS = 200  # a full batch at least this big starts the render process(es)
RENDER_PART = 200  # rows rendered, claimed and queued together: the first are sent while the next render

Row = dict[str, Any]  # a delivery row of the batch query, with its recipient's and event's columns


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What rendering needs of a campaign (picklable, for the render processes)."""

    id: str
    template: str
    sender: str


# What a row renders to: the message, or (suppression/failure reason, detail)
Rendered = RenderedEmail | tuple[str, str]


class RowRenderer:
    """Delivery rows -> messages; picklable settings only."""

    def __init__(
        self,
        templates_dir: Path,
        unsubscribe_mailto: str | None,
        unsubscribe_url: str,
        campaigns: Mapping[str, CampaignSpec],
        unsubscribe_secret: bytes | None = None,
    ) -> None:
        self.renderer = Renderer(templates_dir, unsubscribe_mailto=unsubscribe_mailto)
        self.unsubscribe_url = unsubscribe_url
        self.campaigns = campaigns
        self.unsubscribe_secret = unsubscribe_secret  # None: links without a token (tests of rendering)

    def render_rows(self, rows: list[Row]) -> list[Rendered]:
        out: list[Rendered] = []
        for row in rows:
            try:
                out.append(self.render_row(row))
            except InvalidEmailError:
                out.append(("invalid_email", ""))
            except TemplateRenderError as error:
                out.append(("template_error", str(error)))
            except Exception as error:  # noqa: BLE001 - bad data (a time out of range...) fails its row only
                out.append(("render_error", f"{type(error).__name__}: {error}"))
        return out

    def render_row(self, row: Mapping[str, Any]) -> RenderedEmail:
        campaign = self.campaigns[row["campaign_id"]]
        recipient = {c: row[f"r_{c}"] for c in RECIPIENT_COLUMNS}
        recipient["email"] = row["email"] or recipient["email"]  # the address the decision recorded
        dimensions: dict[str, list[Any]] = {}
        if row["e_payload"]:
            try:
                dimensions = dimension_values(row["e_payload"])
            except (ValueError, TypeError, AttributeError):
                dimensions = {}
        event = event_context(row["e_trigger_id"], row["event_time"], dimensions)
        token = (
            make_token(self.unsubscribe_secret, row["delivery_id"], row["email"], row["campaign_id"])
            if self.unsubscribe_secret is not None
            else ""
        )
        url = unsubscribe_url_for(
            row["delivery_id"], row["campaign_id"], row["recipient_id"], self.unsubscribe_url, token
        )
        return self.renderer.render_bytes(campaign, recipient, event, row["delivery_id"], url, token)


_WORKER_RENDERER: list[RowRenderer] = []  # in a render process: the one set up by _start_render_worker


def _start_render_worker(*settings: Any) -> None:
    _WORKER_RENDERER[:] = [RowRenderer(*settings)]


def _render_in_worker(rows: list[Row]) -> list[Rendered]:
    return _WORKER_RENDERER[0].render_rows(rows)


def default_render_processes() -> int:
    """1 on up to 2 cores (the SMTP relay and the sending process need the rest), else up to 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class BatchRenderer:
    """Renders batches of rows, in ``processes`` render processes once a batch is worth it.

    The processes start at the first full batch of at least RENDER_POOL_MIN_ROWS rows (that batch
    renders here while they start). If they cannot start, or one dies, rendering goes on here.
    """

    def __init__(
        self,
        templates_dir: str | os.PathLike[str],
        unsubscribe_url: str,
        campaigns: Mapping[str, CampaignSpec],
        processes: int,
        unsubscribe_secret: bytes | None = None,
    ) -> None:
        self.templates_dir = Path(templates_dir)
        self.campaigns = campaigns
        self.row_renderer = RowRenderer(
            self.templates_dir, None, unsubscribe_url, campaigns, unsubscribe_secret
        )
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None

    def parts(self, rows: list[Row], limit: int) -> Iterator[tuple[list[Row], list[Rendered]]]:
        """Start rendering ``rows`` (in the render processes, if any, right away); the iterator
        yields (rows, their results) part by part, in order, each as soon as it is ready."""
        parts = [rows[i : i + RENDER_PART] for i in range(0, len(rows), RENDER_PART)]
        pool = self._pool_for(len(rows), limit)
        if pool is None:
            return ((part, self.row_renderer.render_rows(part)) for part in parts)
        futures: list[Future[list[Rendered]]] = [pool.submit(_render_in_worker, part) for part in parts]
        return self._rendered_parts(pool, parts, futures)

    def _pool_for(self, rows: int, limit: int) -> ProcessPoolExecutor | None:
        if self.pool is None and self.processes > 0 and rows >= max(limit, RENDER_POOL_MIN_ROWS):
            try:
                renderer = self.row_renderer
                self.pool = spawn_pool(  # they start while this batch is rendered here
                    self.processes,
                    _start_render_worker,
                    (
                        self.templates_dir,
                        renderer.renderer.unsubscribe_mailto,
                        renderer.unsubscribe_url,
                        self.campaigns,
                        renderer.unsubscribe_secret,
                    ),
                )
            # e.g. a daemonic process may not have children
            except (OSError, AssertionError, ValueError) as error:
                log.warning("rendering in this process: cannot start render processes (%s)", error)
                self.processes = 0
            return None
        return self.pool

    def _rendered_parts(
        self, pool: ProcessPoolExecutor, parts: list[list[Row]], futures: list[Future[list[Rendered]]]
    ) -> Iterator[tuple[list[Row], list[Rendered]]]:
        for i, (part, future) in enumerate(zip(parts, futures, strict=True)):
            try:
                results = future.result()
            except BrokenProcessPool as error:  # a render process died: go on without them
                log.warning("rendering in this process: a render process stopped (%s)", error)
                self.pool = None
                self.processes = 0
                pool.shutdown(wait=False, cancel_futures=True)
                for rest in parts[i:]:
                    yield rest, self.row_renderer.render_rows(rest)
                return
            yield part, results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
