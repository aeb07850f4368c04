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
data interval.

**Params** (the Trigger form, or `airflow dags test triggers_pipeline --conf '{...}'`):
`dry_run` (the match task decides and renders, and reports per campaign what would be sent
and suppressed and why, with rendered samples in its log; nothing is drained, written or
sent), `max_events` (cap on the events drained) and `max_messages` (cap on the emails sent).

**One failing stage does not stop the others.** `match`, `deliver` and `report` run once their
upstream tasks are done, whatever their state: a drain that fails (journal down past
`retry_validity`, 403, a page that cannot be read) still lets the run match and send what is
already staged, and the run's counts are still recorded. The last task, **all_stages_succeeded**,
runs only when every stage succeeded, so such a run still ends *failed* in the UI. `authenticate`
and `drain` are not retried by Airflow: the journal client already retries for
`retry_validity`, and the next run (one schedule interval later) drains from the stored
position; retrying here would only hold back matching and delivery.

Every task has an `execution_timeout`: `TRIGGERS_<TASK>_TIMEOUT` in seconds (e.g.
`TRIGGERS_DELIVER_TIMEOUT`; defaults in `_TIMEOUTS`). Settings: `TRIGGERS_SCHEDULE` (a cron
expression, or a duration such as `30s` for a cadence below one minute; default every minute),
`TRIGGERS_DB_URL`, `TRIGGERS_CONFIG`, `TRIGGERS_TEMPLATES`. See the README for tuning.

**Alerts and metrics** (the configuration's `alerts:` section): a Deadline Alert when a run has
not finished `run_deadline` after it was queued, `on_failure_callback` on a failed run, and the
report task's alert when the lag is above `max_lag`, by email (`SmtpNotifier`) or any Airflow
notifier. The report task also sends the run's counts, lag and send rate to Airflow's metrics
(StatsD or OpenTelemetry, as `[metrics]` says).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from include.config import schedule_timetable
from include.delivery.scaleout import delivery_workers
from include.operations.alerts import dag_alert_arguments, load_alerts

# a cron expression or a duration (30s: below cron's one minute); a bad value fails the import, naming it
TIMETABLE = schedule_timetable("TRIGGERS_SCHEDULE", "* * * * *")
# the `alerts:` section of TRIGGERS_CONFIG: the Deadline Alert and on_failure_callback (none without it)
ALERTS = dag_alert_arguments(load_alerts())
DELIVERY_CONNECTIONS = int(os.environ.get("TRIGGERS_SMTP_CONNECTIONS", "0"))  # 0: sized (delivery/pool.py)
# deliver tasks per run (TRIGGERS_DELIVERY_WORKERS, default 1): competing claimers on one queue, each a
# mapped task on any executor worker (PostgreSQL only above 1: delivery/scaleout.py)
DELIVERY_WORKERS = delivery_workers()
# seconds; a task past its timeout fails (and is retried where it has retries)
_TIMEOUTS = {
    "authenticate": 120,
    "drain": 900,
    "match": 1800,
    "deliver": 1800,
    "report": 300,
    "all_stages_succeeded": 60,
}


def _limits(task_id: str, **settings: Any) -> dict[str, Any]:
    """The task's id, its execution_timeout (``TRIGGERS_<TASK>_TIMEOUT`` overrides) and ``settings``."""
    name = f"TRIGGERS_{task_id.upper()}_TIMEOUT"
    raw = os.environ.get(name, str(_TIMEOUTS[task_id]))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name} is {raw!r}: set it to a number of seconds above 0, or unset it")
    return {"task_id": task_id, "execution_timeout": timedelta(seconds=seconds), **settings}


# runs once its upstream tasks are done, whatever their state: one failed stage stops no other
_AFTER_UPSTREAM = {"trigger_rule": TriggerRule.ALL_DONE}


def _window():
    from include.resources import RunWindow

    return RunWindow.from_context(get_current_context())


# the Trigger form of a manual run (and `airflow dags test --conf`); a scheduled run takes the defaults
PARAMS = {
    "dry_run": Param(
        False,
        type="boolean",
        title="Dry run",
        description="Decide and render, report per campaign what would be sent and suppressed (match "
        "task log); drain, write and send nothing.",
    ),
    "max_events": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max events drained",
        description="Cap on the journal events this run drains (empty: until the journal is empty).",
    ),
    "max_messages": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max messages sent",
        description="Cap on the emails this run sends (empty: every due email).",
    ),
}


def _param(name: str) -> Any:
    return get_current_context()["params"].get(name)


@dag(
    dag_id="triggers_pipeline",
    schedule=TIMETABLE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["triggers", "adobe"],
    params=PARAMS,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
    **ALERTS,
)
def triggers_pipeline() -> None:
    @task(**_limits("authenticate", retries=0))
    def authenticate() -> dict[str, Any]:
        """Obtain (or reuse) the IMS token; only its expiry goes to XCom, never the token."""
        from include.adobe.hook import AdobePipelineHook

        if _window().backfill:
            return {"skipped": "backfill runs do not drain"}
        with AdobePipelineHook() as hook:
            return hook.get_conn().authenticator.token_info()

    @task(**_limits("drain", retries=0))
    def drain(_token: dict[str, Any]) -> dict[str, Any]:
        """Stage every journal event after the stored position."""
        from include.adobe.hook import AdobePipelineHook
        from include.operations.tasks import with_max_events
        from include.resources import open_resources
        from include.staging.drain import drain as drain_journal

        if _window().backfill or _param("dry_run"):
            return {"received": 0, "skipped": "dry run" if _param("dry_run") else "backfill"}
        with (
            open_resources() as res,
            AdobePipelineHook.for_config(res.config, res.settings.pipeline_conn_id) as hook,
        ):
            config = with_max_events(res.config, _param("max_events"))
            return drain_journal(res.engine, config, hook.get_conn()).as_dict()

    @task(**_limits("match", **_AFTER_UPSTREAM))
    def match() -> dict[str, int]:
        """Decide who gets which email for every ready event (or the backfill interval's)."""
        from include.operations.tasks import match_or_preview
        from include.resources import open_resources

        with open_resources() as res:  # dry_run: the whole report, its decisions never written
            return match_or_preview(res, _window(), get_current_context()["params"])

    @task(**_limits("deliver", **_AFTER_UPSTREAM))
    def deliver(worker: int = 0) -> dict[str, int]:
        """Send the pending emails, each delivery_id at most once (``worker``: this task's index of
        TRIGGERS_DELIVERY_WORKERS; each takes its own rows of the one queue)."""
        from include.operations.tasks import deliver_share
        from include.resources import open_resources

        if _param("dry_run"):
            return {"skipped": "dry run"}
        with open_resources() as res:
            return deliver_share(
                res, _window(), _param("max_messages"), worker, DELIVERY_WORKERS, DELIVERY_CONNECTIONS
            )

    @task(**_limits("report", **_AFTER_UPSTREAM))
    def report(
        drained: dict[str, Any] | None, matched: dict[str, int] | None, delivered: dict[str, int] | None
    ) -> dict[str, Any]:
        """Record the run's counts and lag; they show in this task's XCom and the status view.
        A stage that failed has no counts (None): the record names it in ``failed_stages``."""
        from include.operations.tasks import report_run
        from include.resources import open_resources

        if _param("dry_run"):
            return {"dry_run": True, "recorded": False, "report": "the match task's log and XCom"}
        with open_resources() as res:  # counts merged (mapped deliver tasks), metrics, the lag alert
            return report_run(res, get_current_context(), drained, matched, delivered)

    @task(**_limits("all_stages_succeeded", trigger_rule=TriggerRule.ALL_SUCCESS))
    def all_stages_succeeded() -> None:
        """Runs only when every stage succeeded: a run in which one failed ends failed."""

    token = authenticate()
    drained = drain(token)
    matched = match()  # ordered, not fed: a failed drain leaves no XCom to pull
    # one deliver task, or TRIGGERS_DELIVERY_WORKERS mapped ones (a killed one is retried; its claims
    # are taken over by a live sibling or its retry once orphaned: delivery/scaleout.py)
    delivered = deliver() if DELIVERY_WORKERS == 1 else deliver.expand(worker=list(range(DELIVERY_WORKERS)))
    drained >> matched >> delivered
    [token, drained, matched, delivered, report(drained, matched, delivered)] >> all_stages_succeeded()


triggers_pipeline_dag = triggers_pipeline()

if __name__ == "__main__":
    triggers_pipeline_dag.test()
