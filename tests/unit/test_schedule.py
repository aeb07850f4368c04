"""TRIGGERS_SCHEDULE (and TRIGGERS_AUDIENCE_SCHEDULE): a cron expression or a duration, else a
clear error naming the setting and the accepted forms; never another exception."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pendulum
import pytest
from hypothesis import given
from hypothesis import strategies as st

from include.config import parse_schedule, schedule_timetable
from include.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("* * * * *", "* * * * *"),
        ("*/5 * * * *", "*/5 * * * *"),
        (" 0 * * * * ", "0 * * * *"),
        ("@hourly", "@hourly"),
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        (" 1h ", timedelta(hours=1)),
        ("1.5m", timedelta(seconds=90)),
        ("1d", timedelta(days=1)),
    ],
)
def test_a_cron_expression_stays_a_string_and_a_duration_becomes_a_timedelta(value, expected) -> None:
    assert parse_schedule(value) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "write a cron expression"),
        ("every minute", "write a cron expression"),
        ("5", "write a cron expression"),
        ("* * * * * *", "write a cron expression"),  # cron's seconds field: use a duration instead
        ("61 * * * *", "not a valid cron expression"),
        ("0 0 31 2 *", "not a valid cron expression"),  # 31 February never comes
        ("@reboot", "not a valid cron expression"),
        ("0s", "between 1s and 366d"),
        ("0.5s", "between 1s and 366d"),
        ("400d", "between 1s and 366d"),
        ("1e3s", "not a duration"),
    ],
)
def test_a_bad_schedule_names_the_setting_and_the_accepted_forms(value, why) -> None:
    with pytest.raises(ConfigError, match=f"TRIGGERS_SCHEDULE is {re.escape(repr(value))}.*{why}") as raised:
        parse_schedule(value)
    assert "'* * * * *'" in str(raised.value) and "30s" in str(raised.value)


_CRONISH = st.lists(
    st.text(st.sampled_from("0123456789*/,-?LW#@ abcdefgjmnorstuy"), min_size=1, max_size=6),
    min_size=1,
    max_size=7,
).map(" ".join)
_DURATIONISH = st.from_regex(r"\A\s?[0-9]{0,14}(\.[0-9]{0,4})?[smhdx]?\s?\Z")


@given(st.one_of(st.text(), _CRONISH, _DURATIONISH, st.none(), st.integers(), st.floats()))
def test_any_value_gives_a_schedule_or_a_clear_error_never_another_exception(value) -> None:
    try:
        schedule = parse_schedule(value, "TRIGGERS_AUDIENCE_SCHEDULE")
    except ConfigError as error:
        assert str(error).startswith("TRIGGERS_AUDIENCE_SCHEDULE is ")
        return
    if isinstance(schedule, timedelta):
        assert timedelta(seconds=1) <= schedule <= timedelta(days=366)
    else:
        from croniter import croniter

        assert croniter(schedule, datetime(2026, 1, 1, tzinfo=UTC)).get_next(datetime)


def test_the_timetable_keeps_data_intervals_for_both_forms(monkeypatch) -> None:
    monkeypatch.setenv("TRIGGERS_SCHEDULE", "30s")
    timetable = schedule_timetable("TRIGGERS_SCHEDULE", "* * * * *")
    assert type(timetable).__name__ == "DeltaDataIntervalTimetable" and timetable.delta == timedelta(
        seconds=30
    )
    monkeypatch.setenv("TRIGGERS_SCHEDULE", "")  # empty: the default
    timetable = schedule_timetable("TRIGGERS_SCHEDULE", "* * * * *")
    assert type(timetable).__name__ == "CronDataIntervalTimetable" and timetable.expression == "* * * * *"


def test_a_30s_schedule_gives_contiguous_intervals_and_skips_missed_ones_without_catchup() -> None:
    """What the scheduler does with the timetable we give it: a backfill walks 30 s intervals one
    after the other; after a pause, catchup=False schedules the latest interval, not every one missed."""
    from airflow.timetables.base import DataInterval, TimeRestriction
    from airflow.timetables.interval import DeltaDataIntervalTimetable

    timetable = DeltaDataIntervalTimetable(timedelta(seconds=30))
    start = pendulum.datetime(2026, 1, 5, tz="UTC")
    backfill = TimeRestriction(earliest=start, latest=start.add(minutes=2), catchup=True)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=backfill)
    second = timetable.next_dagrun_info(
        last_automated_data_interval=first.data_interval, restriction=backfill
    )
    assert (first.data_interval.start, first.data_interval.end) == (start, start.add(seconds=30))
    assert second.data_interval.start == first.data_interval.end

    long_ago = DataInterval(start.subtract(days=1), start.subtract(days=1).add(seconds=30))
    resumed = timetable.next_dagrun_info(
        last_automated_data_interval=long_ago,
        restriction=TimeRestriction(earliest=start, latest=None, catchup=False),
    )
    assert resumed.data_interval.end >= pendulum.now("UTC").subtract(seconds=60)
