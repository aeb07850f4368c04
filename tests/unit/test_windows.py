"""Send windows: the next opening is inside the window, never in the past, the first open second,
and at most a day (plus the offset change) ahead, in any zone, across DST and the date line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from include.config import ConfigError, parse_config
from include.delivery.windows import is_open, next_opening, parse_window, zone_or_default

ZONES = sorted(available_timezones())
windows = st.tuples(st.integers(0, 1439), st.integers(0, 1439)).filter(lambda w: w[0] != w[1])
instants = st.floats(min_value=0, max_value=datetime(2040, 1, 1, tzinfo=UTC).timestamp())


def at(zone: str, *parts: int) -> float:
    return datetime(*parts, tzinfo=ZoneInfo(zone)).timestamp()


def local(instant: float, zone: str) -> str:
    return datetime.fromtimestamp(instant, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %z")


@settings(max_examples=400, deadline=None)
@given(window=windows, zone=st.sampled_from(ZONES), now=instants)
def test_the_opening_is_the_first_open_second_after_now_and_within_a_day(
    window: tuple[int, int], zone: str, now: float
) -> None:
    tz = ZoneInfo(zone)
    opening = next_opening(window, tz, now)
    if is_open(window, tz, now):
        assert opening is None
        return
    assert opening is not None, f"{window} never opens after {local(now, zone)}"
    assert opening > now
    assert is_open(window, tz, opening)
    assert opening - 1 <= now or not is_open(window, tz, opening - 1), "an earlier second was open"
    before = datetime.fromtimestamp(now, tz).utcoffset()
    after = datetime.fromtimestamp(opening, tz).utcoffset()
    assert before is not None and after is not None
    assert opening - now <= 86400 + abs((after - before).total_seconds())
    # nothing between now and the opening was open (sampled every 10 minutes)
    step = 600.0
    probe = now + step
    while probe < opening - 1:  # (datetime rounds to the microsecond: not within one of the opening)
        assert not is_open(window, tz, probe), f"open at {local(probe, zone)} before {local(opening, zone)}"
        probe += step


def offset_changes(zone: str, first_year: int, last_year: int) -> list[float]:
    """When the zone's offset changed, to the hour (a plain scan, independent of the code tested)."""
    tz, found = ZoneInfo(zone), []
    instant = datetime(first_year, 1, 1, tzinfo=UTC).timestamp()
    end = datetime(last_year + 1, 1, 1, tzinfo=UTC).timestamp()
    offset = datetime.fromtimestamp(instant, tz).utcoffset()
    while instant < end:
        instant += 3600
        if datetime.fromtimestamp(instant, tz).utcoffset() != offset:
            found.append(instant)
            offset = datetime.fromtimestamp(instant, tz).utcoffset()
    return found


DST_ZONES = ("Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Pacific/Apia")
NEAR_CHANGES = [(zone, change) for zone in DST_ZONES for change in offset_changes(zone, 2010, 2030)]


@st.composite
def near_a_change(draw: st.DrawFn) -> tuple[str, tuple[int, int], float]:
    """A zone, a window starting or ending within three hours of one of its clock changes (local
    time), and an instant within a day of that change."""
    zone, instant = draw(st.sampled_from(NEAR_CHANGES))
    before = datetime.fromtimestamp(instant - 1, ZoneInfo(zone))
    around = before.hour * 60 + before.minute + draw(st.integers(-180, 180))
    length = draw(st.integers(1, 1439))
    start = (around - (length if draw(st.booleans()) else 0)) % 1440
    shift = draw(st.floats(min_value=-24 * 3600, max_value=24 * 3600))
    return zone, (start, (start + length) % 1440), instant + shift


@settings(max_examples=600, deadline=None)
@given(case=near_a_change())
def test_around_dst_changes_the_opening_is_still_the_first_open_minute(
    case: tuple[str, tuple[int, int], float],
) -> None:
    zone, window, now = case
    tz = ZoneInfo(zone)
    opening = next_opening(window, tz, now)
    if is_open(window, tz, now):
        assert opening is None
        return
    assert opening is not None and opening > now and is_open(window, tz, opening)
    assert opening - 1 <= now or not is_open(window, tz, opening - 1)
    probe = now + 60.0  # a minute apart: no opening, even by a clock change, is skipped
    while probe < opening - 1:
        assert not is_open(window, tz, probe), f"open at {local(probe, zone)} before {local(opening, zone)}"
        probe += 60.0


@pytest.mark.parametrize(
    ("zone", "now", "window", "expected"),
    [
        # clocks jump 02:00 -> 03:00: a window from 02:30 opens at 03:00 local (01:00 UTC)
        ("Europe/Paris", (2026, 3, 29, 0, 10), "02:30-05:00", "2026-03-29 03:00 +0200"),
        # the night before the jump: 08:00 next morning is 9 h 50 min of elapsed time later, not 10 h 50
        ("Europe/Paris", (2026, 3, 28, 22, 10), "08:00-21:00", "2026-03-29 08:00 +0200"),
        # ... even when the window ends as soon as the skipped hour would have ended
        ("Europe/Paris", (2026, 3, 29, 0, 10), "02:30-03:30", "2026-03-29 03:00 +0200"),
        # clocks going back from 03:00 to 02:00 land inside 01:30-02:30: it opens again then
        ("Europe/Paris", (2026, 10, 25, 2, 40), "01:30-02:30", "2026-10-25 02:00 +0100"),
        # clocks go back 03:00 -> 02:00: a window from 02:30 opens at its first occurrence
        ("Europe/Paris", (2026, 10, 25, 0, 10), "02:30-02:45", "2026-10-25 02:30 +0200"),
        # ... and again at the second occurrence, when the first is over
        ("Europe/Paris", (2026, 10, 25, 2, 50), "02:30-02:45", "2026-10-25 02:30 +0100"),
        ("America/New_York", (2026, 3, 8, 1, 0), "02:15-09:00", "2026-03-08 03:00 -0400"),
        # +14 and -11, on both sides of the date line, the same UTC instant
        ("Pacific/Kiritimati", (2026, 1, 2, 2, 0), "08:00-21:00", "2026-01-02 08:00 +1400"),
        ("Pacific/Pago_Pago", (2026, 1, 1, 1, 0), "08:00-21:00", "2026-01-01 08:00 -1100"),
        # a window across midnight, closed in the afternoon
        ("Asia/Tokyo", (2026, 6, 1, 15, 0), "22:00-06:00", "2026-06-01 22:00 +0900"),
        # Samoa skipped 30 December 2011 (from -10 to +14): the next morning is 31 December
        ("Pacific/Apia", (2011, 12, 29, 22, 0), "08:00-21:00", "2011-12-31 08:00 +1400"),
        # Lord Howe moves by half an hour
        ("Australia/Lord_Howe", (2026, 10, 4, 1, 0), "02:10-03:00", "2026-10-04 02:30 +1100"),
    ],
)
def test_dst_changes_and_the_date_line(zone: str, now: tuple[int, ...], window: str, expected: str) -> None:
    opening = next_opening(parse_window(window), ZoneInfo(zone), at(zone, *now))
    assert opening is not None
    assert local(opening, zone) == expected


def test_the_same_instant_is_open_on_one_side_of_the_date_line_and_closed_on_the_other() -> None:
    noon_utc = datetime(2026, 1, 1, 20, 0, tzinfo=UTC).timestamp()  # 10:00 +14, 09:00 -11
    window = parse_window("09:30-21:00")
    assert is_open(window, ZoneInfo("Pacific/Kiritimati"), noon_utc)
    assert not is_open(window, ZoneInfo("Pacific/Pago_Pago"), noon_utc)
    opening = next_opening(window, ZoneInfo("Pacific/Pago_Pago"), noon_utc)
    assert opening == noon_utc + 1800


def test_an_open_window_gives_none_and_a_bad_zone_falls_back() -> None:
    paris = ZoneInfo("Europe/Paris")
    assert next_opening(parse_window("00:00-23:59"), paris, at("Europe/Paris", 2026, 5, 1, 12, 0)) is None
    assert zone_or_default("Mars/Olympus", paris) is paris
    assert zone_or_default(None, paris) is paris
    assert zone_or_default("Asia/Tokyo", paris) == ZoneInfo("Asia/Tokyo")


CONFIG = """
pipeline:
  consumer: c
  topics: [{name: t, triggers: [{name: cart}]}]
campaigns:
  - id: cart
    trigger: cart
    identity: {field: mcId, column: mc_id}
    template: cart_abandonment
    sender: "Shop <shop@example.com>"
    send_window: "{window}"
    max_age: 6h
    enabled: false
limits:
  send_window: "8:00-21:00"
  default_timezone: {zone}
"""


def test_the_configuration_keys_are_checked_with_their_line() -> None:
    config = parse_config(CONFIG.replace("{window}", "22:00-06:00").replace("{zone}", "Europe/Paris"))
    campaign = config.campaigns[0]
    assert (campaign.send_window, campaign.max_age, campaign.enabled) == ("22:00-06:00", 21600.0, False)
    assert (config.limits.send_window, config.limits.default_timezone) == ("08:00-21:00", "Europe/Paris")
    with pytest.raises(
        ConfigError, match=r"line 16, limits.default_timezone: .*IANA time zone.*Europe/Paris"
    ):
        parse_config(CONFIG.replace("{window}", "08:00-21:00").replace("{zone}", "Europe/Pariss"))
    with pytest.raises(ConfigError, match=r"line 11, campaigns\[0\].send_window: .*HH:MM-HH:MM"):
        parse_config(CONFIG.replace("{window}", "8h-21h").replace("{zone}", "UTC"))
    with pytest.raises(ConfigError, match=r"campaigns\[0\].send_window: .*same time"):
        parse_config(CONFIG.replace("{window}", "08:00-08:00").replace("{zone}", "UTC"))
    seeds = CONFIG.replace("    enabled: false\n", "    seeds: [qa@example.com, 'Boss <boss@example.com>']\n")
    with pytest.raises(ConfigError, match=r"line 13, campaigns\[0\].seeds\[1\]: .*one plain email address"):
        parse_config(seeds.replace("{window}", "08:00-21:00").replace("{zone}", "UTC"))
    with pytest.raises(ConfigError, match=r"campaigns\[0\].max_age: .*duration"):
        parse_config(CONFIG.replace("6h", "soon").replace("{window}", "08:00-21:00").replace("{zone}", "UTC"))


@settings(max_examples=200, deadline=None)
@given(
    window=st.text(max_size=20),
    zone=st.text(max_size=40),
    flag=st.sampled_from(["true", "false", "yes", "maybe", "1", "[]"]),
)
def test_any_value_of_the_new_keys_loads_or_is_a_config_error(window: str, zone: str, flag: str) -> None:
    text = (
        CONFIG.replace('"{window}"', json.dumps(window))
        .replace("{zone}", json.dumps(zone))
        .replace("enabled: false", f"enabled: {flag}")
    )
    try:
        config = parse_config(text)
    except ConfigError as error:
        assert "line" in str(error) or "YAML" in str(error)
        return
    start, end = parse_window(config.campaigns[0].send_window or "00:00-01:00")
    assert 0 <= start < 1440 and 0 <= end < 1440 and start != end
    assert config.limits.default_timezone is None or ZoneInfo(config.limits.default_timezone)
