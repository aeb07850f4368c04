"""Parse journal pages (SPEC section 3) straight into flat staging columns.

A page is parsed into one list per column and the nested dicts are dropped with the page:
millions of live dicts would make the garbage collector, not the parser, the bottleneck.

msgspec splits a page into each event's raw text and decodes only the fields staging reads
into typed structs (5x the stdlib parser). An event those types do not fit (not an object, a
field of an unexpected type, a float out of range...) is read again from its text by the
generic path, which decides its quarantine reason: both paths give the same row.

Nothing a page carries makes parsing raise, except a page whose structure cannot be read at all
(UnreadablePageError): an event that is not valid UTF-8 or JSON, too deep, too large or with an
absurd time is quarantined with the reason, and text the databases cannot hold is made storable
(``limits``). A page that is not valid as a whole is split by ``salvage``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import msgspec

from include.config import VALUE_SEPARATOR, TriggersConfig, dimension_column
from include.runtime import collector_paused
from include.staging.limits import (
    EARLIEST_TIME,
    LATEST_AHEAD,
    MAX_DEPTH,
    storable,
    storable_json,
    time_problem,
    too_deep,
)
from include.staging.salvage import salvage_page

PIPELINE_MESSAGE = "com.adobe.mcloud.pipeline.pipelineMessage"
TRIGGER = "com.adobe.mcloud.protocol.trigger"

# the position of events staged from an export (`python -m include.cli import`), not the journal
IMPORTED_POSITION = "import"

# The columns parse_events fills, in pipeline_events order; dim_* columns follow.
BASE_COLUMNS = (
    "event_id",
    "position",
    "consumer",
    "trigger_id",
    "time_gmt",
    "received_at",
    "status",
    "reason",
    "mc_id",
    "payload",
)


@dataclass
class ParsedPage:
    """One page as columns (``rows()`` yields insertable tuples) plus its paging facts."""

    columns: tuple[str, ...]
    values: list[list[Any]]
    last_position: str | None
    count: int = 0
    quarantined: int = 0
    ignored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[tuple[Any, ...]]:
        return list(zip(*self.values, strict=True))

    @classmethod
    def merge(cls, pages: Sequence[ParsedPage]) -> ParsedPage:
        """Consecutive pages as one; its position is the last page's."""
        if len(pages) == 1:
            return pages[0]
        values = [
            list(chain.from_iterable(page.values[i] for page in pages)) for i in range(len(pages[0].columns))
        ]
        last = next((p.last_position for p in reversed(pages) if p.last_position is not None), None)
        merged = cls(
            pages[0].columns,
            values,
            last,
            sum(p.count for p in pages),
            sum(p.quarantined for p in pages),
            sum(p.ignored for p in pages),
        )
        for page in pages:
            for reason, count in page.reasons.items():
                merged.reasons[reason] = merged.reasons.get(reason, 0) + count
        return merged


class EventParser:
    """Turns journal items into staging rows for one configuration."""

    def __init__(self, config: TriggersConfig) -> None:
        self.consumer = config.pipeline.consumer
        self.max_msg_size = config.pipeline.max_msg_size
        self.known_triggers = frozenset(config.trigger_labels)
        self.accepts_all = config.accepts_all_triggers
        self.dimensions = config.dimensions
        self.columns = BASE_COLUMNS + tuple(dimension_column(d) for d in self.dimensions)
        self._no_dimensions: tuple[None, ...] = (None,) * len(self.dimensions)

    def parse_page(self, body: bytes, received_at: float) -> ParsedPage:
        """A 200 body of the journal: ``{"events": [...], "_page": {"last": ...}}``.

        Each event's payload is sliced from the body as sent, not re-serialised: that is both
        the raw message and its exact size, at no cost.
        """
        with collector_paused():  # a page allocates thousands of containers that all die together
            try:
                journal_page = _PAGE.decode(body)
            except (ValueError, RecursionError):  # not JSON to msgspec: read what can be read
                return self._parse_page_generic(body, received_at)
            clean = b"\\u0000" in body  # a position may hold NUL
            page = self._columns(
                self._read_raw(journal_page.events, clean), len(journal_page.events), received_at
            )
            last = journal_page.page.get("last") if isinstance(journal_page.page, dict) else None
            if last is not None:
                page.last_position = storable(str(last))
            return page

    def _parse_page_generic(self, body: bytes, received_at: float) -> ParsedPage:
        """What can be read of any body; UnreadablePageError if not even its structure."""
        items, last = salvage_page(body)
        page = self._columns(
            ((position, *self._read_text(raw)) for position, raw in items), len(items), received_at
        )
        if last is not None:
            page.last_position = last
        return page

    def unreadable_page(self, body: bytes, reason: str, position: str, received_at: float) -> ParsedPage:
        """A page whose structure cannot be read, as one quarantined row at ``position``."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        payload = storable(body.decode("utf-8", "replace"))
        page = self._columns([(position, payload, self._quarantine(digest, reason))], 1, received_at)
        page.last_position = position
        return page

    def parse_items(
        self, items: Sequence[tuple[str | None, Any, str | bytes | None]], received_at: float
    ) -> ParsedPage:
        """``(position, event, raw JSON text or bytes, or None: the event is serialised)`` triples
        to columns; the raw text is read as a journal event's (``event`` is then unused)."""
        return self._columns(self._read_items(items), len(items), received_at)

    def _read_items(
        self, items: Iterable[tuple[str | None, Any, str | bytes | None]]
    ) -> Iterable[tuple[str | None, str, tuple]]:
        for position, event, payload in items:
            if payload is None:
                try:
                    payload = json.dumps(event, separators=(",", ":"))
                except (ValueError, TypeError, RecursionError) as error:
                    payload = storable(repr(event)[:10_000])
                    yield position, payload, self._quarantine(_digest(payload), f"not JSON ({error})")
                    continue
            yield position, *self._read_text(payload)

    def _read_raw(self, items: Iterable[_Item], clean: bool) -> Iterable[tuple[str | None, str, tuple]]:
        """Typed decoding of each event's raw text; the generic path for what does not fit (or may
        hold NUL, or has many brackets: their depth is checked there)."""
        decode = _EVENT.decode
        max_size = self.max_msg_size
        for item in items:
            raw = bytes(item.event)
            position = None if item.position is msgspec.UNSET else str(item.position)
            if clean and position is not None:
                position = storable(position)
            fields = None
            if (
                len(raw) <= max_size
                and (b"\\" not in raw or b"\\u0000" not in raw)  # a memchr spares most events the search
                and raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH
            ):
                try:
                    payload = raw.decode()
                    fields = self._read_typed(decode(raw), len(raw))
                except (ValueError, RecursionError):  # msgspec's errors, UnicodeDecodeError
                    fields = None
            if fields is None:
                payload, fields = self._read_text(raw)
            yield position, payload, fields

    def _read_text(self, raw: bytes | str) -> tuple[str, tuple]:
        """``(payload, fields of _read)`` of one event's raw text, whatever it holds."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode()
            except UnicodeDecodeError as error:
                payload = storable(raw.decode("utf-8", "replace"))
                digest = "sha256:" + hashlib.sha256(raw).hexdigest()
                return payload, self._quarantine(digest, f"not valid UTF-8 (byte {error.start} of the event)")
        payload = storable_json(raw)
        size = len(payload) if payload.isascii() else len(payload.encode())
        if size > self.max_msg_size:
            return payload, self._quarantine(
                _identity_of_large(payload), f"larger than max_msg_size ({size} > {self.max_msg_size} bytes)"
            )
        if too_deep(payload):
            return payload, self._quarantine(_digest(payload), f"nested deeper than {MAX_DEPTH} levels")
        try:
            event = json.loads(payload)
        except ValueError as error:
            return payload, self._quarantine(_digest(payload), f"not valid JSON ({error})")
        return payload, self._read(event, payload)

    def _quarantine(self, event_id: str, reason: str) -> tuple:
        return event_id, None, None, None, reason, self._no_dimensions

    def _columns(
        self, read: Iterable[tuple[str | None, str, tuple]], count: int, received_at: float
    ) -> ParsedPage:
        """Rows of ``(position or None, payload, fields of _read)`` to columns."""
        values: list[list[Any]] = [[] for _ in self.columns]
        (
            event_ids,
            positions,
            consumers,
            trigger_ids,
            times,
            received,
            statuses,
            reasons,
            mc_ids,
            payloads,
        ) = values[:10]
        dimension_lists = values[10:]
        page = ParsedPage(self.columns, values, None, count)
        position = None
        latest = received_at + LATEST_AHEAD
        for item_position, payload, fields in read:
            position = item_position if item_position is not None else position
            status, reason = "new", fields[4]
            time_gmt = fields[2]
            if not reason and time_gmt is not None and not EARLIEST_TIME <= time_gmt <= latest:
                reason = time_problem(time_gmt, received_at)
                fields = (*fields[:2], None, *fields[3:])
            if reason:
                status = "quarantined"
                page.quarantined += 1
                page.reasons[reason] = page.reasons.get(reason, 0) + 1
            elif not self.accepts_all and fields[1] not in self.known_triggers:
                status = "ignored"
                page.ignored += 1
            event_ids.append(fields[0])
            positions.append(position or "")
            consumers.append(self.consumer)
            trigger_ids.append(fields[1])
            times.append(fields[2] if fields[2] is not None else received_at)
            received.append(received_at)
            statuses.append(status)
            reasons.append(reason)
            mc_ids.append(fields[3])
            payloads.append(payload)
            for column, values_of_dimension in zip(dimension_lists, fields[5], strict=True):
                column.append(values_of_dimension)
        page.last_position = position
        return page

    def _read_typed(self, event: _Event, size: int) -> tuple | None:
        """``_read`` of an event decoded into structs, or None where only the generic path decides
        (no identity: its hash needs the whole event; a quarantine: the generic path names it)."""
        if event.event is not None:
            envelope, message = event.event, event.event.message
        else:
            envelope, message = event, event.message
        if message is not None:
            header, trigger = message.header, message.trigger
            event_id = (header.messageId if header is not None else None) or event.event_id
            created = envelope.createTime
        else:  # the bare trigger object
            header, trigger, event_id, created = None, event, event.event_id, None
        if not event_id or size > self.max_msg_size or trigger is None:
            return None
        trigger_id = trigger.triggerId
        if not isinstance(trigger_id, str) or not trigger_id.strip():
            return None
        time_gmt, bad_time = _event_time(
            trigger.triggerTimestamp,
            trigger.timeGMT,
            header.sentTime if header is not None else None,
            created,
        )
        if bad_time:
            return None
        mc_id = trigger.mcId
        dimensions: dict[str, Any] = {}
        summary = trigger.enrichments.summary if trigger.enrichments is not None else None
        if summary is not None and summary.dimensions is not None:
            dimensions = {key.strip(): dimension.data for key, dimension in summary.dimensions.items()}
        return (
            str(event_id),
            trigger_id.strip(),
            time_gmt,
            str(mc_id) if mc_id else None,
            None,
            [_joined(dimensions.get(name)) for name in self.dimensions],
        )

    def _read(
        self, event: Any, payload: str
    ) -> tuple[str, str | None, float | None, str | None, str | None, Sequence[str | None]]:
        """(event_id, trigger_id, time_gmt, mc_id, quarantine reason or None, dimension values)."""
        no_dimensions = self._no_dimensions
        if not isinstance(event, dict):
            return _digest(payload), None, None, None, "not a JSON object", no_dimensions
        inner = event.get("event")
        message = inner.get(PIPELINE_MESSAGE) if isinstance(inner, dict) else event.get(PIPELINE_MESSAGE)
        if isinstance(message, dict):
            header = message.get("header") if isinstance(message.get("header"), dict) else {}
            trigger = message.get(TRIGGER)
            event_id = header.get("messageId") or event.get("event_id")
            envelope = inner if isinstance(inner, dict) else event
        else:  # the bare trigger object
            header, trigger, event_id, envelope = {}, event, event.get("event_id"), {}
        event_id = str(event_id) if event_id else _digest(_canonical(event))
        size = len(payload) if payload.isascii() else len(payload.encode())
        if size > self.max_msg_size:
            return (
                event_id,
                None,
                None,
                None,
                f"larger than max_msg_size ({size} > {self.max_msg_size} bytes)",
                no_dimensions,
            )
        if (
            not isinstance(trigger, dict)
            or not isinstance(trigger.get("triggerId"), str)
            or not trigger["triggerId"].strip()
        ):
            return event_id, None, None, None, "no triggerId", no_dimensions
        trigger_id = trigger["triggerId"].strip()
        time_gmt, bad_time = _event_time(
            trigger.get("triggerTimestamp"),
            trigger.get("timeGMT"),
            header.get("sentTime"),
            envelope.get("createTime"),
        )
        if bad_time:
            return event_id, trigger_id, None, None, bad_time, no_dimensions
        mc_id = trigger.get("mcId")
        dimensions = _dimensions(trigger)
        return (
            event_id,
            trigger_id,
            time_gmt,
            str(mc_id) if mc_id else None,
            None,
            [_joined(_data(dimensions.get(name))) for name in self.dimensions],
        )


# What staging reads of a page and of an event, for msgspec; every other field is skipped.
class _Item(msgspec.Struct):
    position: Any = msgspec.UNSET
    event: msgspec.Raw = msgspec.Raw(b"null")  # an item without an event is a null one


class _Page(msgspec.Struct):
    events: list[_Item]
    page: Any = msgspec.field(default=None, name="_page")


class _Dimension(msgspec.Struct):
    data: Any = None


class _Summary(msgspec.Struct):
    dimensions: dict[str, _Dimension] | None = None


class _Enrichments(msgspec.Struct, rename={"summary": "analyticsHitSummary"}):
    summary: _Summary | None = None


class _Trigger(msgspec.Struct):
    triggerId: Any = None  # noqa: N815 (Adobe's names)
    triggerTimestamp: Any = None  # noqa: N815
    timeGMT: Any = None  # noqa: N815
    mcId: Any = None  # noqa: N815
    enrichments: _Enrichments | None = None


class _Header(msgspec.Struct):
    messageId: Any = None  # noqa: N815
    sentTime: Any = None  # noqa: N815


class _Message(msgspec.Struct, rename={"trigger": TRIGGER}):
    header: _Header | None = None
    trigger: _Trigger | None = None


class _Envelope(msgspec.Struct, rename={"message": PIPELINE_MESSAGE}):
    message: _Message | None = None
    createTime: Any = None  # noqa: N815


class _Event(_Trigger, rename={"message": PIPELINE_MESSAGE}):
    """Either form of SPEC section 3: an envelope, or the bare trigger object."""

    event_id: Any = None
    event: _Envelope | None = None
    message: _Message | None = None
    createTime: Any = None  # noqa: N815


_PAGE = msgspec.json.Decoder(_Page)
_EVENT = msgspec.json.Decoder(_Event)


_TIMESTAMPS = (("triggerTimestamp", 1000.0), ("timeGMT", 1.0), ("sentTime", 1000.0), ("createTime", 1000.0))


def _event_time(*values: Any) -> tuple[float | None, str | None]:
    """Unix seconds of the first timestamp given of the trigger's ``triggerTimestamp`` and
    ``timeGMT``, the header's ``sentTime``, the envelope's ``createTime``; or the name of the
    timestamp that is not a number."""
    for value, (key, scale) in zip(values, _TIMESTAMPS, strict=True):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"{key} is not a number"
        try:
            return value / scale, None
        except OverflowError:  # an integer beyond any float
            return None, f"{key} is out of range"
    return None, None


def _dimensions(trigger: dict[str, Any]) -> dict[str, Any]:
    """``enrichments.analyticsHitSummary.dimensions`` with keys trimmed (Adobe's " eVar01")."""
    try:
        dimensions = trigger["enrichments"]["analyticsHitSummary"]["dimensions"]
    except (KeyError, TypeError):
        return {}
    if not isinstance(dimensions, dict):
        return {}
    return {str(key).strip(): value for key, value in dimensions.items()}


def _data(dimension: Any) -> Any:
    return dimension.get("data") if isinstance(dimension, dict) else None


def _joined(data: Any) -> str | None:
    """A dimension's ``data`` as one column value."""
    if not isinstance(data, list):
        return None
    values = [str(v).replace(VALUE_SEPARATOR, " ") for v in data if v is not None and v != ""]
    return VALUE_SEPARATOR.join(values) if values else None


def trigger_of(event: Any) -> dict[str, Any]:
    """The trigger object of an event in either form of SPEC section 3 ({} if none)."""
    if not isinstance(event, dict):
        return {}
    inner = event.get("event")
    message = inner.get(PIPELINE_MESSAGE) if isinstance(inner, dict) else event.get(PIPELINE_MESSAGE)
    trigger = message.get(TRIGGER) if isinstance(message, dict) else event
    return trigger if isinstance(trigger, dict) else {}


def dimension_values(payload: str) -> dict[str, list[Any]]:
    """Every dimension of a stored event as name -> values (what templates see)."""
    dimensions = _dimensions(trigger_of(json.loads(payload)))
    return {name: list(d.get("data") or []) for name, d in dimensions.items() if isinstance(d, dict)}


def dimension_columns_of(payload: str, names: Sequence[str]) -> list[str | None]:
    """The ``dim_*`` column values of a stored event for the dimensions ``names``."""
    dimensions = _dimensions(trigger_of(json.loads(payload)))
    return [_joined(_data(dimensions.get(name))) for name in names]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _identity_of_large(payload: str) -> str:
    """The identity of an event too large to stage: its id if msgspec finds one without building
    the rest (no Python recursion, nothing kept), else the digest of its text."""
    try:
        event = _EVENT.decode(payload)
    except (ValueError, RecursionError):
        return _digest(payload)
    inner = event.event.message if event.event is not None else event.message
    header = inner.header if inner is not None else None
    event_id = (header.messageId if header is not None else None) or event.event_id
    return storable(str(event_id)) if event_id and isinstance(event_id, (str, int)) else _digest(payload)
