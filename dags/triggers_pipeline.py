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
import time
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

SCHEDULE = os.environ.get("TRIGGERS_SCHEDULE", "* * * * *")
DELIVERY_CONNECTIONS = int(os.environ.get("TRIGGERS_SMTP_CONNECTIONS", "2"))


def _run_window() -> tuple[float, tuple[float, float] | None, str]:
    """(the run's "now", the data interval for a backfill run else None, the run id).

    "Now" is the end of the run's data interval, so that rerunning a run reproduces it; for a
    backfill run it is the real now: the interval's last events wait for ``unless`` windows
    that close after its end, and no later backfill run would take them.
    """
    context = get_current_context()
    dag_run = context["dag_run"]
    end = context.get("data_interval_end") or dag_run.run_after
    start = context.get("data_interval_start") or end
    backfill = str(dag_run.run_type).lower().endswith("backfill")
    now = time.time() if backfill else end.timestamp()
    return now, ((start.timestamp(), end.timestamp()) if backfill else None), dag_run.run_id


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

        if _run_window()[1] is not None:
            return {"skipped": "backfill runs do not drain"}
        with AdobePipelineHook() as hook:
            return hook.get_conn().token_info()

    @task
    def drain(_token: dict[str, Any]) -> dict[str, Any]:
        """Stage every journal event after the stored position."""
        from include.adobe.hook import AdobePipelineHook
        from include.config import Settings, load_config
        from include.database.engine import make_engine
        from include.staging.drain import drain as drain_journal

        if _run_window()[1] is not None:
            return {"received": 0, "skipped": "backfill"}
        settings = Settings.from_env()
        config = load_config(settings.config_path, settings.templates_dir)
        with AdobePipelineHook() as hook:
            report = drain_journal(make_engine(settings.db_url), config, hook.get_conn())
        return report.as_dict()

    @task
    def match(_drained: dict[str, Any]) -> dict[str, int]:
        """Decide who gets which email for every ready event (or the backfill interval's)."""
        from include.config import Settings, load_config
        from include.database.engine import make_engine
        from include.matching.run import match_ready_events

        now, interval, _ = _run_window()
        settings = Settings.from_env()
        config = load_config(settings.config_path, settings.templates_dir)
        return match_ready_events(make_engine(settings.db_url), config, now=now, interval=interval)

    @task
    def deliver(_matched: dict[str, int]) -> dict[str, int]:
        """Send the pending emails, each delivery_id at most once."""
        from airflow.sdk import BaseHook

        from include.config import Settings, load_config
        from include.database.engine import make_engine
        from include.delivery.sender import SmtpSettings, deliver_pending

        _, interval, run_id = _run_window()
        settings = Settings.from_env()
        config = load_config(settings.config_path, settings.templates_dir)
        smtp = SmtpSettings.from_connection(BaseHook.get_connection(settings.smtp_conn_id))
        return deliver_pending(
            make_engine(settings.db_url), config, smtp, templates_dir=settings.templates_dir,
            worker_id=run_id, connections=DELIVERY_CONNECTIONS, interval=interval,
        )

    @task
    def report(drained: dict[str, Any], matched: dict[str, int], delivered: dict[str, int]) -> dict[str, Any]:
        """Record the run's counts and lag; they show in this task's XCom and the status view."""
        from include.config import Settings
        from include.database.engine import make_engine
        from include.operations.report import record_run

        now, _, run_id = _run_window()
        settings = Settings.from_env()
        return record_run(make_engine(settings.db_url), run_id, drained, matched, delivered)

    drained = drain(authenticate())
    matched = match(drained)
    delivered = deliver(matched)
    report(drained, matched, delivered)


triggers_pipeline_dag = triggers_pipeline()

if __name__ == "__main__":
    triggers_pipeline_dag.test()
