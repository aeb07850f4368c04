"""
# triggers_feedback

Reads the bounce mailbox (Airflow connection `imap_default`) for what came back from the
emails sent:

* **bounces**: delivery status notifications (RFC 3464) mark the delivery `bounced` with the
  diagnostic; a status that says the address is bad (5.1.1, 5.1.2, 5.1.3, 5.1.6, 5.1.10, 5.2.1)
  also suppresses the address (`hard_bounce`) for every campaign; a delay notice is only counted;
* **complaints**: feedback-loop reports (ARF, RFC 5965) that name a delivery of ours (VERP
  address or Message-ID) suppress its address (`complaint`);
* **mailto unsubscribes** (`unsubscribe-<token>` subjects, the link's signed token) suppress it
  (`unsubscribed`).

Handled reports move to `Triggers/Processed`; reports that cannot be read, name no delivery
we sent or carry no valid token move to `Triggers/Unprocessed` (put one back in the inbox to have
it read again); a report about an email whose send is not recorded yet waits in the inbox; other
messages are left in place. A report read twice changes nothing. The task returns the counts.

Settings: `TRIGGERS_FEEDBACK_SCHEDULE` (cron, default every 5 minutes),
`TRIGGERS_FEEDBACK_TIMEOUT` (seconds, default 600), `TRIGGERS_BOUNCE_ADDRESS` (the VERP
envelope sender, e.g. `bounces+{delivery_id}@shop.example.com`), `TRIGGERS_FEEDBACK_FOLDER`,
`TRIGGERS_FEEDBACK_PROCESSED_FOLDER`, `TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER`,
`TRIGGERS_DB_URL`, `TRIGGERS_CONFIG`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

SCHEDULE = os.environ.get("TRIGGERS_FEEDBACK_SCHEDULE", "*/5 * * * *")


def _timeout() -> timedelta:
    raw = os.environ.get("TRIGGERS_FEEDBACK_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ValueError(
            f"TRIGGERS_FEEDBACK_TIMEOUT is {raw!r}: set it to a number of seconds above 0, or unset it"
        )
    return timedelta(seconds=seconds)


@dag(
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["triggers", "deliverability"],
    default_args={
        "owner": "triggers",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": _timeout(),
    },
)
def triggers_feedback():
    @task
    def read_bounce_mailbox() -> dict:
        """Apply the mailbox's bounces, complaints and mailto unsubscribes; return the counts."""
        from include.bounces.mailbox import MailboxOptions, open_mailbox, read_mailbox
        from include.resources import open_resources

        options = MailboxOptions.from_env()
        with open_resources() as res, open_mailbox(options.conn_id, options.timeout) as client:
            return read_mailbox(res.engine, client, options)

    read_bounce_mailbox()


feedback_dag = triggers_feedback()

if __name__ == "__main__":
    feedback_dag.test()
