"""Send windows (quiet hours, SPEC section 9): when, in the recipient's time zone, an email may go.

A window is a time of day range in local wall-clock time, ``"08:00-21:00"``, start included and
end excluded; a start after the end wraps midnight (``"22:00-06:00"``). Pure functions of the
window, a ``ZoneInfo`` and a UTC instant (seconds since the epoch): zoneinfo does the DST and
date-line arithmetic; nothing here reads a clock.

Local times that a DST change skips never occur: a window opening at 02:30 on the night clocks
jump from 02:00 to 03:00 opens at 03:00 (the first instant whose local time is inside it). A
local time that occurs twice (clocks going back) opens at its first occurrence, and again at the
second if the window had closed in between; clocks going back from 02:40 to 02:00 open a window
01:30-02:30 at that instant.
"""

from __future__ import annotations

import math
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from include.config import send_window_minutes

UTC_ZONE = ZoneInfo("UTC")
Window = tuple[int, int]  # minutes after local midnight: (opens, closes)
HORIZON = 52 * 3600.0  # the next opening is at most a day and a skipped day away


def parse_window(text: str) -> Window:
    """``"08:00-21:00"`` -> (480, 1260); ValueError for anything else (the config checks it first)."""
    return send_window_minutes(text)


def zone_or_default(name: str | None, default: ZoneInfo) -> ZoneInfo:
    """The recipient's zone; ``default`` when it has none or one this machine does not know (the
    audience load refuses unknown names, but a row may have been written by other means)."""
    if name and isinstance(name, str):
        try:
            return ZoneInfo(name.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            return default
    return default


def is_open(window: Window, zone: ZoneInfo, instant: float) -> bool:
    """Whether sending is allowed at ``instant`` (UTC seconds) for a recipient in ``zone``."""
    local = datetime.fromtimestamp(instant, zone)
    minute = local.hour * 60 + local.minute
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def next_opening(window: Window, zone: ZoneInfo, now: float) -> float | None:
    """None when the window is open at ``now``; else the first instant after ``now`` (UTC
    seconds) at which it is open: within a day, or a day and the offset change across DST.

    A window opens either when the local time reaches its start (a start that occurs twice
    opens at each occurrence) or when the clock changes into it: a start skipped by a DST gap
    opens when the gap ends if that is inside the window, and clocks going back can land inside
    it. The candidates are both, over the next two days.
    """
    if is_open(window, zone, now):
        return None
    start = time(window[0] // 60, window[0] % 60)
    today = datetime.fromtimestamp(now, zone).date()
    candidates = []
    for days in (-1, 0, 1, 2):  # 2: a zone that skipped a whole day (Pacific/Apia, 2011-12-30)
        wall = datetime.combine(today + timedelta(days=days), start)
        for fold in (0, 1):
            instant = wall.replace(tzinfo=zone, fold=fold).timestamp()
            if instant > now and datetime.fromtimestamp(instant, zone).replace(tzinfo=None) == wall:
                candidates.append(instant)
    changes = _offset_changes(zone, now, now + HORIZON)
    candidates += [change for change in changes if change > now and is_open(window, zone, change)]
    return min(candidates, default=None)


def _offset_changes(zone: ZoneInfo, start: float, end: float) -> list[float]:
    """The instants (whole seconds) in (start, end] at which the zone's UTC offset changes: found
    hour by hour (no zone changes twice within an hour), each located by bisection."""
    changes = []
    before, offset = start, datetime.fromtimestamp(start, zone).utcoffset()
    while before < end:
        after = min(before + 3600.0, end)
        offset_after = datetime.fromtimestamp(after, zone).utcoffset()
        if offset_after != offset:
            low, high = math.floor(before), math.ceil(after)
            while high - low > 1:
                middle = (low + high) // 2
                if datetime.fromtimestamp(middle, zone).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            changes.append(float(high))
            offset = offset_after
        before = after
    return changes
