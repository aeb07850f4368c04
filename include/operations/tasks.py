"""The bodies of the pipeline DAG's tasks that are more than one call (the DAG file stays a list
of tasks and their order: dags/triggers_pipeline.py)."""

from __future__ import annotations

import time
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


def deliver_share(
    res: Any, window: Any, max_messages: int | None, worker: int, workers: int, connections: int
) -> dict[str, Any]:
    """The deliver task (``worker`` of ``workers`` mapped ones, competing claimers of one queue):
    send its share of the due emails; task 0 also sends the campaigns' seed copies."""
    from include.delivery.hook import PipeliningSmtpHook
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    from include.delivery.scaleout import check_workers, delivery_lease, mapped_worker_id, share
    from include.previews.seeds import send_seed_copies

    cap = share(max_messages, workers, worker)
    if cap == 0:
        return {"skipped": "max_messages reached by the other workers"}
    check_workers(res.engine, workers)
    smtp = PipeliningSmtpHook(res.settings.smtp_conn_id).session_settings()
    options = DeliveryOptions(
        templates_dir=res.settings.templates_dir,
        worker_id=window.run_id if workers == 1 else mapped_worker_id(window.run_id, worker),
        connections=connections,
        interval=window.interval,
        max_messages=cap,
        lease=delivery_lease(),
    )
    started = time.time()
    counts = deliver_pending(res.engine, res.config, smtp, options)
    seconds = round(time.time() - started, 3)  # the send rate's denominator (report's metrics)
    # campaigns' seed addresses: a proof copy of each campaign's first email of this run (once)
    seeds = (
        send_seed_copies(res.engine, res.config, res.settings.templates_dir, smtp, started)
        if worker == 0
        else {}
    )
    return {**counts, **seeds, "deliver_seconds": seconds}


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
