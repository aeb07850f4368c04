"""The run's metrics (include/operations/metrics.py): every count named, and the Prometheus text
read back by the reference parser (prometheus_client), whatever the counts hold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from include.operations.metrics import prometheus_text, run_metrics, send_rate

COUNTS = {
    "drained": 1200,
    "staged": 1100,
    "duplicates": 100,
    "quarantined": 3,
    "ignored": 7,
    "retried_requests": 2,
    "ready": 1090,
    "matched": 800,
    "sent": 500,
    "failed": 4,
    "retried": 9,
    "suppressed_opted_out": 20,
    "suppressed_frequency cap": 5,
    "deliver_seconds": 2.5,
    "lag_seconds": 42.5,
    "failed_stages": "drain",
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_count_is_named() -> None:
    metrics = run_metrics(COUNTS)
    assert metrics == {
        "triggers.events.received": 1200,
        "triggers.events.staged": 1100,
        "triggers.events.quarantined": 3,
        "triggers.events.ignored": 7,
        "triggers.events.matched": 800,
        "triggers.emails.sent": 500,
        "triggers.emails.failed": 4,
        "triggers.emails.retried": 9,
        "triggers.emails.suppressed.frequency_cap": 5,
        "triggers.emails.suppressed.opted_out": 20,
        "triggers.journal.retried_requests": 2,
        "triggers.lag_seconds": 42.5,
        "triggers.send_rate": 200.0,
    }
    assert send_rate({"sent": 10}) == 0.0 and send_rate({"sent": 0, "deliver_seconds": 3}) == 0.0


def test_prometheus_text_parses_with_the_reference_parser() -> None:
    samples = _samples(prometheus_text((COUNTS, 1767225600.0)))
    assert samples[("triggers_run_events", (("kind", "received"),))] == 1200
    assert samples[("triggers_run_emails", (("outcome", "sent"),))] == 500
    assert samples[("triggers_run_suppressed", (("reason", "frequency_cap"),))] == 5
    assert samples[("triggers_lag_seconds", ())] == 42.5
    assert samples[("triggers_send_rate", ())] == 200.0
    assert samples[("triggers_run_finished_timestamp_seconds", ())] == 1767225600.0


def test_before_any_run_only_the_families_are_declared() -> None:
    families = list(text_string_to_metric_families(prometheus_text(None)))
    assert families and all(not family.samples for family in families)
    assert {family.type for family in families} == {"gauge"}


numbers = st.one_of(st.integers(0, 10**12), st.floats(0, 1e12, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    counts=st.dictionaries(
        st.one_of(st.text(max_size=30), st.text(max_size=30).map(lambda reason: "suppressed_" + reason)),
        st.one_of(numbers, st.text(max_size=10), st.none()),
        max_size=12,
    ),
    finished=st.floats(0, 4e9, allow_nan=False),
)
def test_any_recorded_counts_give_parseable_text(counts: dict, finished: float) -> None:
    """The counts come from a JSON column: any key (a suppression reason is free text), any value."""
    numeric = {k: v for k, v in counts.items() if isinstance(v, int | float)}
    try:
        metrics = run_metrics(numeric)
    except (TypeError, ValueError) as error:  # pragma: no cover - would be the bug this test looks for
        pytest.fail(f"run_metrics({numeric!r}): {error}")
    samples = _samples(prometheus_text((numeric, finished)))
    suppressed = {name for name in metrics if name.startswith("triggers.emails.suppressed.")}
    reasons = {labels[0][1] for (name, labels) in samples if name == "triggers_run_suppressed"}
    assert len(reasons) == len(suppressed)
    assert samples[("triggers_run_finished_timestamp_seconds", ())] == pytest.approx(finished)
