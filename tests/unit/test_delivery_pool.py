"""How many SMTP sessions a run opens and how many unrecorded messages each may have
(include/delivery/pool.py): the sizing rules and the crash-window bound they give."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from include.delivery.options import DeliveryOptions
from include.delivery.pool import (
    DEFAULT_MAX_CONNECTIONS,
    FAR_ROUND_TRIP,
    FAR_WINDOW,
    NEAR_SESSIONS,
    NEAR_WINDOW,
    plan,
)


def options(**chosen: int) -> DeliveryOptions:
    return DeliveryOptions(templates_dir=".", worker_id="t", **{"connections": 0, **chosen})


def test_far_without_a_rate_opens_the_cap_with_a_window_of_two() -> None:
    chosen = plan(options(), 0.050, pipelining=True, chunking=False, rate=None)
    assert (chosen.connections, chosen.window, chosen.far) == (DEFAULT_MAX_CONNECTIONS, FAR_WINDOW, True)
    assert chosen.connections * chosen.window == 64  # the crash window of one worker


def test_near_keeps_two_sessions_and_the_window_of_sixteen() -> None:
    chosen = plan(options(), 0.0002, pipelining=True, chunking=False, rate=None)
    assert (chosen.connections, chosen.window, chosen.far) == (NEAR_SESSIONS, NEAR_WINDOW, False)


def test_an_explicit_count_and_window_are_kept_and_the_cap_is_a_setting() -> None:
    explicit = plan(options(connections=5, window=3), 0.05, pipelining=True, chunking=False, rate=None)
    assert (explicit.connections, explicit.window) == (5, 3)
    assert (
        plan(options(max_connections=7), 0.05, pipelining=False, chunking=False, rate=None).connections == 7
    )


def test_an_unknown_round_trip_opens_one_session() -> None:
    assert plan(options(), None, pipelining=False, chunking=False, rate=None).connections == 1


def test_a_rate_sizes_the_pool_by_what_one_session_sends_a_round_trip() -> None:
    # 100/s, 50 ms: a rate-limited pipelining session sends one message per two round trips (10/s)
    assert plan(options(), 0.05, pipelining=True, chunking=False, rate=100).connections == 13
    # with CHUNKING two messages go per round trip (40/s): 4 sessions
    assert plan(options(), 0.05, pipelining=True, chunking=True, rate=100).connections == 4
    # without PIPELINING one message per four round trips (5/s): 25 sessions
    assert plan(options(), 0.05, pipelining=False, chunking=False, rate=100).connections == 25


@given(
    round_trip=st.floats(min_value=1e-5, max_value=1.0),
    rate=st.one_of(st.none(), st.floats(min_value=0.01, max_value=1e6)),
    cap=st.integers(min_value=1, max_value=500),
    pipelining=st.booleans(),
    chunking=st.booleans(),
)
def test_the_pool_stays_within_one_and_the_cap_and_the_window_follows_the_distance(
    round_trip: float, rate: float | None, cap: int, pipelining: bool, chunking: bool
) -> None:
    chosen = plan(
        options(max_connections=cap), round_trip, pipelining=pipelining, chunking=chunking, rate=rate
    )
    assert 1 <= chosen.connections <= cap
    assert chosen.window == (FAR_WINDOW if round_trip > FAR_ROUND_TRIP else NEAR_WINDOW)
    if rate is None and round_trip > FAR_ROUND_TRIP:
        assert chosen.connections == cap
    if rate is not None and chosen.connections < cap:  # enough sessions for the rate, with headroom
        per_round_trip = chosen.window if pipelining and chunking else (0.5 if pipelining else 0.25)
        assert chosen.connections >= math.floor(rate * max(round_trip, 1e-4) / per_round_trip)
