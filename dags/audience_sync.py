"""
### audience_sync

Keeps `recipients` in step with the audience database users already have (a warehouse, a CRM):
a query through an Airflow SQL connection (postgres, mysql, ... through the common SQL
provider's hook), read in chunks.

1. **Upsert** every row the query returns, with the CSV load's validation: a bad row is
   rejected with its reason (`missing_recipient_id`, `bad_opted_out`, `shopper_id_taken`, ...),
   counted and shown as "row N: why" in this task's log and XCom.
2. **Remove** the recipients the query no longer returns. Only `recipients` rows: suppressions
   stay, `deliveries` rows stay (the dedupe and frequency-cap memory), and a pending email of a
   removed recipient is suppressed at send time as `unknown_recipient`. A recipient whose row
   was rejected is kept.

**Safety guard**: a sync whose query returns no row, or that would remove more than
`TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE` of the recipients (default 0.1), changes nothing and fails
without retrying: an empty or cut-short result is more often a broken query than a lost
audience. Check the query; when the removals are real, trigger the DAG with the param
`force_removals` (or run `python -m include.cli audience sync --force ...`).

Settings: `TRIGGERS_AUDIENCE_CONN_ID` (unset: the run is skipped), `TRIGGERS_AUDIENCE_SQL` or
`TRIGGERS_AUDIENCE_SQL_FILE` (columns named as the CSV header: `SELECT id AS recipient_id, ...`),
`TRIGGERS_AUDIENCE_SCHEDULE` (a cron expression or a duration, default hourly),
`TRIGGERS_AUDIENCE_CHUNK_SIZE` (rows per chunk, default 50000), `TRIGGERS_AUDIENCE_TIMEOUT`
(seconds, default 3600), `TRIGGERS_DB_URL`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from include.audience.source import timeout_setting
from include.config import schedule_timetable

# a bad value fails the import with an AudienceError naming the setting and its range
_TIMEOUT = timedelta(seconds=timeout_setting())


@dag(
    dag_id="audience_sync",
    schedule=schedule_timetable("TRIGGERS_AUDIENCE_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["triggers", "audience"],
    params={
        "force_removals": Param(
            False,
            type="boolean",
            title="Force removals",
            description="Remove every recipient the query no longer returns, even past "
            "TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE or when it returns no row.",
        )
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "execution_timeout": _TIMEOUT,
    },
)
def audience_sync() -> None:
    @task
    def sync() -> dict[str, Any]:
        """Upsert the query's recipients and remove those it no longer returns; the report to XCom."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from include.audience.source import AudienceSource, sync_recipients
        from include.errors import RemovalRefusedError
        from include.resources import open_resources

        source = AudienceSource.from_env()
        if source.conn_id is None:
            raise AirflowSkipException("TRIGGERS_AUDIENCE_CONN_ID is not set: no audience database to sync")
        if not source.sql:
            raise AirflowFailException(
                "set TRIGGERS_AUDIENCE_SQL or TRIGGERS_AUDIENCE_SQL_FILE: the audience query"
            )
        with open_resources() as res:
            try:
                return sync_recipients(
                    res.engine,
                    source.conn_id,
                    source.sql,
                    chunk_size=source.chunk_size,
                    max_removed_share=source.max_removed_share,
                    force=bool(get_current_context()["params"].get("force_removals")),
                )
            except RemovalRefusedError as error:
                raise AirflowFailException(str(error)) from None  # a retry would refuse again

    sync()


audience_sync_dag = audience_sync()

if __name__ == "__main__":
    audience_sync_dag.test()
