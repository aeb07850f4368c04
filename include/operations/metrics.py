"""A run's counts, lag and send rate as metrics: through Airflow's metrics facade (StatsD or
OpenTelemetry, whichever ``[metrics]`` the user's Airflow is configured for) and as Prometheus
text for the status view's ``/triggers/metrics``.

The names (StatsD, under Airflow's ``statsd_prefix``; Prometheus, the same with ``_``):

=================================  =========================================  =======
StatsD / OpenTelemetry             Prometheus (last recorded run)             kind
=================================  =========================================  =======
triggers.events.<kind>             triggers_run_events{kind="<kind>"}         counter
triggers.emails.<outcome>          triggers_run_emails{outcome="<outcome>"}   counter
triggers.emails.suppressed.<why>   triggers_run_suppressed{reason="<why>"}    counter
triggers.journal.retried_requests  triggers_run_journal_retried_requests      counter
triggers.lag_seconds               triggers_lag_seconds                       gauge
triggers.send_rate                 triggers_send_rate                         gauge
=================================  =========================================  =======

``<kind>``: received, staged, quarantined, ignored, matched; ``<outcome>``: sent, failed,
retried. StatsD counters add each run's counts; Prometheus shows the last run's (gauges), plus
``triggers_run_finished_timestamp_seconds``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select

from include.database.hourly import SUPPRESSED
from include.database.schema import pipeline_runs

log = logging.getLogger(__name__)

PREFIX = "triggers"
EVENT_KINDS = {"received": "drained", "staged": "staged", "quarantined": "quarantined", "ignored": "ignored"}
EVENT_KINDS["matched"] = "matched"
EMAIL_OUTCOMES = ("sent", "failed", "retried")
_NAME_PART = re.compile(r"[^a-zA-Z0-9_]")


def send_rate(counts: Mapping[str, Any]) -> float:
    """Emails sent per second of the deliver task (0 when it sent none or was not timed)."""
    seconds = float(counts.get("deliver_seconds") or 0)
    return round(counts.get("sent", 0) / seconds, 3) if seconds > 0 else 0.0


def run_metrics(counts: Mapping[str, Any]) -> dict[str, float]:
    """A run's counts (:func:`include.operations.report.run_counts` plus ``lag_seconds``) as
    ``{statsd name: value}``: every count named in the module's table, 0 when the run had none."""
    metrics: dict[str, float] = {}
    for kind, key in EVENT_KINDS.items():
        metrics[f"{PREFIX}.events.{kind}"] = counts.get(key, 0)
    for outcome in EMAIL_OUTCOMES:
        metrics[f"{PREFIX}.emails.{outcome}"] = counts.get(outcome, 0)
    for key, value in sorted(counts.items()):
        if key.startswith(SUPPRESSED) and isinstance(value, int | float):
            name = f"{PREFIX}.emails.suppressed.{_name_part(key[len(SUPPRESSED) :])}"
            metrics[name] = metrics.get(name, 0) + value  # reasons that differ only in punctuation
    metrics[f"{PREFIX}.journal.retried_requests"] = counts.get("retried_requests", 0)
    metrics[f"{PREFIX}.lag_seconds"] = counts.get("lag_seconds", 0.0)
    metrics[f"{PREFIX}.send_rate"] = send_rate(counts)
    return metrics


GAUGES = (f"{PREFIX}.lag_seconds", f"{PREFIX}.send_rate")


def emit_run_metrics(counts: Mapping[str, Any]) -> dict[str, float]:
    """Send the run's metrics through Airflow's facade (nothing leaves when ``[metrics]`` enables
    no backend); return them. Counters are incremented by the run's counts, gauges set."""
    from airflow.sdk.observability import stats

    metrics = run_metrics(counts)
    for name, value in metrics.items():
        if name in GAUGES:
            stats.gauge(name, value)
        else:  # a run without any still sends its 0: every series exists from the first run on
            stats.incr(name, int(value))
    return metrics


def _name_part(text: str) -> str:
    return _NAME_PART.sub("_", text) or "unknown"


# ---------------------------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_HELP = {
    "triggers_run_events": "Journal events of the last recorded run, by kind.",
    "triggers_run_emails": "Emails of the last recorded run, by outcome.",
    "triggers_run_suppressed": "Emails suppressed in the last recorded run, by reason.",
    "triggers_run_journal_retried_requests": "Journal requests retried in the last recorded run.",
    "triggers_lag_seconds": "Age of the oldest staged event waiting for matching, at the last run.",
    "triggers_send_rate": "Emails sent per second by the last run's deliver task.",
    "triggers_run_finished_timestamp_seconds": "When the last recorded run finished (unix seconds).",
}


def last_run(engine: Engine) -> tuple[dict[str, Any], float] | None:
    """The counts of the last recorded run and when it finished, or None before any run."""
    query = select(pipeline_runs.c.counts, pipeline_runs.c.finished_at).order_by(
        pipeline_runs.c.finished_at.desc()
    )
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    if row is None:
        return None
    try:
        counts = json.loads(row.counts) if row.counts else {}
    except ValueError:  # a row written by hand or cut short: its time still says the pipeline runs
        log.warning("the last run's counts in pipeline_runs are not JSON; its counts are left out")
        counts = {}
    return (counts if isinstance(counts, dict) else {}), float(row.finished_at)


def prometheus_text(run: tuple[Mapping[str, Any], float] | None) -> str:
    """The last run's metrics (:func:`run_metrics`) in Prometheus' text format; before any run,
    only the families' HELP and TYPE lines."""
    samples: dict[str, list[tuple[str, float]]] = {family: [] for family in _HELP}
    if run is not None:
        counts, finished_at = run
        for name, value in run_metrics(counts).items() if counts else ():
            family, labels = _prometheus_name(name)
            samples[family].append((labels, float(value)))
        samples["triggers_run_finished_timestamp_seconds"].append(("", finished_at))
    lines = []
    for family, help_text in _HELP.items():
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        lines += [f"{family}{labels} {_number(value)}" for labels, value in samples[family]]
    return "\n".join(lines) + "\n"


def _prometheus_name(statsd_name: str) -> tuple[str, str]:
    """``triggers.emails.suppressed.opted_out`` -> (``triggers_run_suppressed``, ``{reason="opted_out"}``)."""
    parts = statsd_name.split(".")[1:]
    if parts[0] == "events":
        return "triggers_run_events", f'{{kind="{parts[1]}"}}'
    if parts[0] == "emails" and parts[1] == "suppressed":
        return "triggers_run_suppressed", f'{{reason="{parts[2]}"}}'
    if parts[0] == "emails":
        return "triggers_run_emails", f'{{outcome="{parts[1]}"}}'
    if parts[0] == "journal":
        return "triggers_run_journal_retried_requests", ""
    return f"triggers_{parts[0]}", ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
