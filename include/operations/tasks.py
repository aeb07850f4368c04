"""The bodies of the pipeline DAG's tasks that are more than one call (the DAG file stays a list
of tasks and their order: dags/triggers_pipeline.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from include.config import TriggersConfig
from include.operations.report import StageCounts


def with_max_events(config: TriggersConfig, max_events: int | None) -> TriggersConfig:
    """``config`` with the run's ``max_events`` param as the drain's cap (unchanged without it)."""
    if not max_events:
        return config
    pipeline = config.pipeline.model_copy(update={"max_events_per_run": int(max_events)})
    return config.model_copy(update={"pipeline": pipeline})


def match_or_preview(res: Any, window: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The match task: the decisions written, or with ``dry_run`` the whole report (its rendered
    decisions never written)."""
    if params.get("dry_run"):
        from include.previews.dry_run import dry_run

        return dry_run(
            res.engine,
            res.config,
            res.settings.templates_dir,
            now=window.now,
            interval=window.interval,
            max_messages=params.get("max_messages"),
        )
    from include.matching.run import match_ready_events

    return match_ready_events(res.engine, res.config, now=window.now, interval=window.interval)


def report_run(
    res: Any,
    context: Mapping[str, Any],
    drained: StageCounts,
    matched: StageCounts,
    delivered: StageCounts | list[dict[str, Any]],
) -> dict[str, Any]:
    """The report task: record the run's counts and lag, send them to Airflow's metrics and alert
    when the lag went above ``alerts.max_lag``. ``delivered`` may be the mapped deliver tasks'
    list of counts (merged here)."""
    from include.delivery.scaleout import merge_counts
    from include.operations.alerts import alert_on_lag
    from include.operations.metrics import emit_run_metrics
    from include.operations.report import lag_before, record_run

    if delivered is not None and not isinstance(delivered, dict):
        delivered = merge_counts(delivered)
    run = context["dag_run"]
    started = run.start_date  # the status view's "Took"
    counts = record_run(
        res.engine,
        run.run_id,
        drained,
        matched,
        delivered,
        started_at=started.timestamp() if started else None,
    )
    emit_run_metrics(counts)  # to StatsD or OpenTelemetry, as the [metrics] section says
    alerts = res.config.alerts
    if alerts is not None and alerts.max_lag is not None:
        before = lag_before(res.engine, run.run_id, alerts.max_lag)
        alert_on_lag(alerts, counts["lag_seconds"], context, before)
    return counts
