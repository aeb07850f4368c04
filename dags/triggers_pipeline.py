"""
### triggers_pipeline

The near-real-time micro-batch of Adobe Campaign's Triggers integration:

1. **authenticate** to Adobe IMS with the `adobe_pipeline` connection (JWT or OAuth); the
   token is cached and reused until shortly before it expires;
2. **drain** the pipeline journal into `pipeline_events` until it answers 204 (or the
   per-run cap), each page stored in the same transaction that advances the position;
3. **match** the ready events to campaigns and join them with `recipients`, writing
   decisions to `deliveries`;
4. **deliver** the pending emails through `smtp_default`, each `delivery_id` once;
5. **report** the run's counts and lag (this task's XCom, and the Triggers status view).

A backfill run skips the drain and processes only the events whose time falls in its
data interval. Settings: `TRIGGERS_SCHEDULE` (cron, default every minute), `TRIGGERS_DB_URL`,
`TRIGGERS_CONFIG`, `TRIGGERS_TEMPLATES`. See the README for tuning.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

SCHEDULE = os.environ.get("TRIGGERS_SCHEDULE", "* * * * *")
DELIVERY_CONNECTIONS = int(os.environ.get("TRIGGERS_SMTP_CONNECTIONS", "2"))


def _window():
    from include.resources import RunWindow

    return RunWindow.from_context(get_current_context())


@dag(
    dag_id="triggers_pipeline",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["triggers", "adobe"],
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
)
def triggers_pipeline() -> None:
    @task
    def authenticate() -> dict[str, Any]:
        """Obtain (or reuse) the IMS token; only its expiry goes to XCom, never the token."""
        from include.adobe.hook import AdobePipelineHook

        if _window().backfill:
            return {"skipped": "backfill runs do not drain"}
        with AdobePipelineHook() as hook:
            return hook.get_conn().authenticator.token_info()

    @task
    def drain(_token: dict[str, Any]) -> dict[str, Any]:
        """Stage every journal event after the stored position."""
        from include.adobe.hook import AdobePipelineHook
        from include.resources import open_resources
        from include.staging.drain import drain as drain_journal

        if _window().backfill:
            return {"received": 0, "skipped": "backfill"}
        with (
            open_resources() as res,
            AdobePipelineHook.for_config(res.config, res.settings.pipeline_conn_id) as hook,
        ):
            return drain_journal(res.engine, res.config, hook.get_conn()).as_dict()

    @task
    def match(_drained: dict[str, Any]) -> dict[str, int]:
        """Decide who gets which email for every ready event (or the backfill interval's)."""
        from include.matching.run import match_ready_events
        from include.resources import open_resources

        window = _window()
        with open_resources() as res:
            return match_ready_events(res.engine, res.config, now=window.now, interval=window.interval)

    @task
    def deliver(_matched: dict[str, int]) -> dict[str, int]:
        """Send the pending emails, each delivery_id at most once."""
        from include.delivery.hook import PipeliningSmtpHook
        from include.delivery.options import DeliveryOptions
        from include.delivery.run import deliver_pending
        from include.resources import open_resources

        window = _window()
        with open_resources() as res:
            smtp = PipeliningSmtpHook(res.settings.smtp_conn_id).session_settings()
            options = DeliveryOptions(
                templates_dir=res.settings.templates_dir,
                worker_id=window.run_id,
                connections=DELIVERY_CONNECTIONS,
                interval=window.interval,
            )
            return deliver_pending(res.engine, res.config, smtp, options)

    @task
    def report(drained: dict[str, Any], matched: dict[str, int], delivered: dict[str, int]) -> dict[str, Any]:
        """Record the run's counts and lag; they show in this task's XCom and the status view."""
        from include.operations.report import record_run
        from include.resources import open_resources

        with open_resources() as res:
            return record_run(res.engine, _window().run_id, drained, matched, delivered)

    drained = drain(authenticate())
    matched = match(drained)
    delivered = deliver(matched)
    report(drained, matched, delivered)


triggers_pipeline_dag = triggers_pipeline()

if __name__ == "__main__":
    triggers_pipeline_dag.test()
