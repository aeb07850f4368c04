"""Alerts (include/operations/alerts.py) through Airflow's notifiers, for real: the SMTP
provider's SmtpNotifier over `smtp_default` to the local SMTP server, and any notifier named by
configuration; the DAG arms a Deadline Alert and an on_failure_callback from the `alerts:` section.

The scheduler-driven parts (a run past its deadline, a failed run) are in test_alerts_airflow.py."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import BaseNotifier
from hypothesis import given, settings
from hypothesis import strategies as st

from include.config import parse_config
from include.errors import ConfigError
from include.operations.alerts import alert_on_lag, dag_alert_arguments, deadline_missed, notifiers
from include.sandbox.smtp_server import LocalSmtpServer

PIPELINE = "pipeline: {consumer: c, topics: [{name: t, triggers: [{name: a}]}]}\n"
RECEIVED: list[dict[str, Any]] = []


class RecordingNotifier(BaseNotifier):
    """An Airflow notifier as a Slack or Teams one is built: templated fields, ``notify``."""

    template_fields = ("text", "channel")

    def __init__(self, text: str, channel: str = "#ops", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text, self.channel = text, channel

    def notify(self, context: Any) -> None:
        RECEIVED.append({"text": self.text, "channel": self.channel})


def _alerts(yaml_text: str):
    return parse_config(PIPELINE + textwrap.dedent(yaml_text)).alerts


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch):
    with LocalSmtpServer() as server:
        connection = {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": server.port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.com"},
        }
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(connection))
        yield server


def test_a_lag_above_the_threshold_emails_the_recipients(smtp: LocalSmtpServer) -> None:
    alerts = _alerts("alerts: {email: [oncall@example.com, lead@example.com], max_lag: 10m}\n")
    context = {"dag_run": SimpleNamespace(run_id="scheduled__2026-01-01T00:00:00+00:00")}

    assert not alert_on_lag(alerts, 599.0, context) and not smtp.messages  # at the threshold: quiet
    assert alert_on_lag(alerts, 3725.0, context)
    (message,) = smtp.messages
    assert set(message.rcpt_tos) == {"oncall@example.com", "lead@example.com"}
    assert message.mail_from == "airflow@example.com"  # the connection's from_email
    assert message["Subject"] == "triggers_pipeline: the lag is 3,725 s (above 600 s)"
    body = message.message.get_body(("html",)).get_content()
    assert "received 3,725 s ago" in body and "scheduled__2026-01-01T00:00:00+00:00" in body


def test_a_relay_that_refuses_a_lag_alert_does_not_fail_the_report(smtp: LocalSmtpServer) -> None:
    alerts = _alerts("alerts: {email: [oncall@example.com], max_lag: 1s}\n")
    smtp.fail_next(50, "554 5.7.1 Relay access denied", at="RCPT")  # past the hook's retries
    assert not alert_on_lag(alerts, 5.0, {"dag_run": SimpleNamespace(run_id="r1")})


def test_any_notifier_by_configuration_sees_the_alert(smtp: LocalSmtpServer) -> None:
    RECEIVED.clear()
    alerts = _alerts(
        """
        alerts:
          max_lag: 1m
          notifier:
            class: tests.integration.test_alerts.RecordingNotifier
            kwargs: {text: "{{ alert.kind }}: {{ alert.title }}", channel: "#triggers"}
        """
    )
    assert alert_on_lag(alerts, 120.0, {"dag_run": SimpleNamespace(run_id="r1")})
    assert RECEIVED == [
        {"text": "lag: triggers_pipeline: the lag is 120 s (above 60 s)", "channel": "#triggers"}
    ]
    assert not smtp.messages  # no email configured: the notifier alone


def test_the_deadline_callback_emails(smtp: LocalSmtpServer, tmp_path: Path, monkeypatch) -> None:
    """What the executor runs when the scheduler finds the run past its deadline (its context is
    the run as JSON and the deadline)."""
    config = tmp_path / "triggers.yaml"
    config.write_text(PIPELINE + "alerts: {email: [oncall@example.com], run_deadline: 90s}\n")
    monkeypatch.setenv("TRIGGERS_CONFIG", str(config))
    deadline_missed({"dag_run": {"dag_run_id": "manual__1", "state": "running"}, "deadline": {}}, 90.0)
    (message,) = smtp.messages
    assert message["Subject"] == "triggers_pipeline run manual__1 has not finished 90 s after it was queued"


def test_the_dag_arguments_follow_the_section() -> None:
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    assert dag_alert_arguments(None) == {}
    arguments = dag_alert_arguments(_alerts("alerts: {email: [a@example.com], run_deadline: 15m}\n"))
    deadline = arguments["deadline"]
    assert isinstance(deadline, DeadlineAlert) and deadline.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert deadline.interval.total_seconds() == 900 and isinstance(deadline.callback, SyncCallback)
    assert deadline.callback.path == "include.operations.alerts.deadline_missed"
    assert arguments["on_failure_callback"].__name__ == "run_failed"
    quiet = dag_alert_arguments(_alerts("alerts: {email: [a@example.com], on_failure: false}\n"))
    assert quiet == {}


@pytest.mark.parametrize(
    ("section", "key", "says"),
    [
        ("alerts: {max_lag: 5m}", "alerts", "give email"),
        ("alerts: {email: oncall}", "alerts.email", "valid list"),
        ("alerts: {email: [oncall]}", "alerts.email[0]", "not one plain email address"),
        ("alerts: {email: [a@example.com], run_deadline: 0s}", "alerts.run_deadline", "greater than 0"),
        ("alerts: {email: [a@example.com], max_lag: an hour}", "alerts.max_lag", "not a duration"),
        ("alerts: {notifier: {class: 'slack please'}}", "alerts.notifier.class", "not a dotted class path"),
        ("alerts: {notifier: {klass: a.B}}", "alerts.notifier", "class"),
        ("alerts: {email: [a@example.com], deadline: 5m}", "alerts.deadline", "Extra inputs"),
    ],
)
def test_a_bad_section_names_the_key(section: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(PIPELINE + section + "\n", "triggers.yaml")
    assert f"triggers.yaml line 2, {key}" in str(raised.value) and says in str(raised.value)


def test_a_notifier_that_cannot_be_built_names_the_key() -> None:
    missing = _alerts(
        "alerts: {notifier: {class: airflow.providers.slack.notifications.slack.SlackNotifier}}\n"
    )
    with pytest.raises(
        ConfigError, match=r"alerts.notifier.class: cannot import .*apache-airflow-providers-slack"
    ):
        notifiers(missing)
    not_one = _alerts("alerts: {notifier: {class: include.config.Alerts}}\n")
    with pytest.raises(ConfigError, match="alerts.notifier.class: .* is not an Airflow notifier"):
        notifiers(not_one)
    wrong = _alerts(
        "alerts: {notifier: {class: tests.integration.test_alerts.RecordingNotifier, kwargs: {txt: hi}}}\n"
    )
    with pytest.raises(ConfigError, match="alerts.notifier.kwargs: .*RecordingNotifier refuses them"):
        notifiers(wrong)


class FailingWebhookNotifier(BaseNotifier):
    """A webhook notifier whose endpoint is down; its error names the URL, secret included."""

    template_fields = ()

    def notify(self, context: Any) -> None:
        raise ConnectionError("POST https://hooks.slack.com/services/T000/B000/s3cr3tT0ken failed: refused")


def test_a_failing_notifier_is_logged_without_its_url_and_the_others_still_told(
    smtp: LocalSmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = _alerts(
        "alerts: {email: [oncall@example.com], max_lag: 1s, notifier: "
        "{class: tests.integration.test_alerts.FailingWebhookNotifier}}\n"
    )
    assert alert_on_lag(alerts, 5.0, {"dag_run": SimpleNamespace(run_id="r1")})  # the email went
    assert len(smtp.messages) == 1
    assert "FailingWebhookNotifier: ConnectionError: POST <url> failed" in caplog.text
    assert "s3cr3t" not in caplog.text
    with pytest.raises(RuntimeError, match="the deadline alert could not be sent"):  # a callback fails loudly
        from include.operations.alerts import send_alert

        send_alert(alerts, "deadline", "t", "x", {}, strict=True)


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.text(max_size=12), st.integers(-5, 10**6), st.floats(allow_nan=True), st.none()))
def test_any_threshold_is_accepted_as_a_duration_or_refused_naming_its_key(value: Any) -> None:
    document = PIPELINE + "alerts:\n  email: [a@example.com]\n  max_lag: " + json.dumps(value) + "\n"
    try:
        alerts = parse_config(document, "triggers.yaml").alerts
    except ConfigError as error:
        assert "triggers.yaml line 4, alerts.max_lag: " in str(error), str(error)
    else:  # null: no lag alert
        assert (
            (alerts.max_lag is None)
            if value is None
            else (isinstance(alerts.max_lag, float) and alerts.max_lag > 0)
        )


# --- the lag alert tells the change, not every run (and again after repeat_every) -----------------


def _lag_series(engine, alerts, lags: list[float], every: float = 60.0) -> list[bool]:
    """Record one run per ``every`` seconds with these lags (as the report task does) and return
    for each whether it alerted."""
    from sqlalchemy import update

    from include.database.schema import pipeline_runs
    from include.operations.report import lag_before, record_run

    told = []
    for n, lag in enumerate(lags):
        run_id, now = f"scheduled__{n}", 1_000_000.0 + n * every
        record_run(engine, run_id, {}, {}, {})
        with engine.begin() as conn:  # the lag measured and the time of this run, as given
            conn.execute(
                update(pipeline_runs)
                .where(pipeline_runs.c.run_id == run_id)
                .values(lag_seconds=lag, finished_at=now, started_at=now)
            )
        before = lag_before(engine, run_id, alerts.max_lag)
        told.append(alert_on_lag(alerts, lag, {"dag_run": SimpleNamespace(run_id=run_id)}, before, now))
    return told


def test_the_lag_alerts_once_when_it_goes_above_and_again_after_it_came_back(smtp, engine) -> None:
    from tests.conftest import upgrade_schema

    upgrade_schema(engine)
    alerts = _alerts("alerts: {email: [oncall@example.com], max_lag: 10m}\n")
    told = _lag_series(engine, alerts, [700, 800, 900, 100, 650, 700, 600, 900])
    assert told == [True, False, False, False, True, False, False, True]
    assert len(smtp.messages) == 3


def test_with_repeat_every_a_lag_that_stays_above_is_told_again(smtp, engine) -> None:
    from tests.conftest import upgrade_schema

    upgrade_schema(engine)
    alerts = _alerts("alerts: {email: [oncall@example.com], max_lag: 10m, repeat_every: 3m}\n")
    # one run a minute, above from the first: told at 0, 3 and 6 minutes; below, then above again
    told = _lag_series(engine, alerts, [700] * 8 + [10, 700, 700, 700, 700])
    assert told == [True, False, False, True, False, False, True, False, False, True, False, False, True]


@settings(max_examples=100, deadline=None)
@given(
    lags=st.lists(st.sampled_from([0.0, 600.0, 700.0]), max_size=14),
    repeat=st.sampled_from([None, 60.0, 120.0, 300.0]),
)
def test_the_lag_alert_decision_over_any_series(lags: list[float], repeat: float | None) -> None:
    """Without a database, one run a minute: a series of runs above max_lag (600 s) is told at its
    first run, then at each whole repeat_every after it; a run at or below is never told."""
    from include.operations.alerts import lag_alert_due
    from include.operations.report import LagBefore

    every = f", repeat_every: {repeat:g}s" if repeat else ""
    alerts = _alerts("alerts: {email: [a@example.com], max_lag: 600s" + every + "}\n")
    before, since, told, expected = None, None, [], []
    for n, lag in enumerate(lags):
        now = n * 60.0
        told.append(lag_alert_due(alerts, lag, now, before))
        above = lag > 600
        since = (since if before is not None and before.lag_seconds > 600 else now) if above else None
        expected.append(above and (now == since or bool(repeat) and (now - since) % repeat == 0))
        before = LagBefore(lag, now, since)
    assert told == expected


# --- a mistake elsewhere in the file never stops the alerts ----------------------------------


def test_only_the_alerts_section_is_read_for_the_dag_and_its_callbacks(smtp, tmp_path, monkeypatch) -> None:
    from include.operations.alerts import load_alerts, run_failed

    config = tmp_path / "triggers.yaml"
    # a typo in a campaign (the tasks report it) and an unknown top-level key
    config.write_text(
        PIPELINE
        + "campaigns: [{id: c1, trigger: nowhere, subjct: oops}]\nlimts: {}\n"
        + "alerts: {email: [oncall@example.com], run_deadline: 5m}\n"
    )
    monkeypatch.setenv("TRIGGERS_CONFIG", str(config))
    with pytest.raises(ConfigError):
        parse_config(config.read_text())  # the whole file is wrong...
    assert load_alerts().run_deadline == 300  # ...the alerts still read
    assert set(dag_alert_arguments(load_alerts())) == {"deadline", "on_failure_callback"}
    run_failed({"dag_run": SimpleNamespace(run_id="scheduled__1"), "reason": "task_failure"})
    (message,) = smtp.messages
    assert message["Subject"] == "triggers_pipeline run scheduled__1 failed"


def test_a_bad_alerts_section_names_its_key_and_a_callback_logs_it(
    smtp, tmp_path, monkeypatch, caplog
) -> None:
    from include.operations.alerts import load_alerts, run_failed

    config = tmp_path / "triggers.yaml"
    config.write_text(PIPELINE + "alerts: {email: [oncall@example.com], max_lag: soon}\n")
    monkeypatch.setenv("TRIGGERS_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"line 2, alerts\.max_lag"):
        load_alerts()  # the DAG's import error names the key
    run_failed({"dag_run": SimpleNamespace(run_id="scheduled__1")})  # does not raise
    assert "the failure alert cannot be sent: the alerts section cannot be read" in caplog.text
    assert "alerts.max_lag" in caplog.text and not smtp.messages
