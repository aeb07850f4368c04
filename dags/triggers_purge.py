"""
# triggers_purge

The daily purge of the staging database, as Campaign's purge of its pipeline events.

* **Staged events** (`pipeline_events`) received more than `pipeline.retention` ago
  (default **3 days**) are deleted — except events still `new`: those have not been processed
  yet, so they are kept and counted in a warning rather than lost.
* **Deliveries** are the dedupe and frequency-cap memory: finished ones (`sent`, `failed`,
  `suppressed`, `bounced`) are kept for `pipeline.delivery_retention` (default **90 days**, and never less
  than the longest `dedupe` or `limits.per_recipient.per`). `pending` ones are never purged.
* **Run records** (`pipeline_runs`) are kept as long as deliveries.

Deletes run in batches of `TRIGGERS_PURGE_BATCH` rows (default 10,000), one transaction each.
The cut-off is the end of the run's data interval, so a rerun deletes what the original run
would have. The task fails after `TRIGGERS_PURGE_TIMEOUT` seconds (default 7200); a purge
cut short has committed its earlier batches, and the next run goes on. Settings:
`TRIGGERS_DB_URL`, `TRIGGERS_CONFIG`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task

_BATCH_SIZE = int(os.environ.get("TRIGGERS_PURGE_BATCH", "10000"))
_TIMEOUT = timedelta(seconds=float(os.environ.get("TRIGGERS_PURGE_TIMEOUT", "7200")))


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["triggers", "maintenance"],
    default_args={
        "owner": "triggers",
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "execution_timeout": _TIMEOUT,
    },
)
def triggers_purge():
    @task
    def purge_expired_rows() -> dict:
        """Delete staged events and deliveries older than their retention; return the counts."""
        from include.operations.purge import purge
        from include.resources import RunWindow, open_resources

        window = RunWindow.from_context(get_current_context())
        with open_resources() as res:
            return purge(res.engine, res.config, now=window.end, batch_size=_BATCH_SIZE).as_dict()

    purge_expired_rows()


purge_dag = triggers_purge()

if __name__ == "__main__":
    purge_dag.test()
