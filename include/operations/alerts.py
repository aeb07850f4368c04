"""Alerts through Airflow's own mechanisms, configured by the ``alerts:`` section.

* a **Deadline Alert** on ``triggers_pipeline``: a run not finished ``run_deadline`` after it was
  queued. The scheduler evaluates it and hands :func:`deadline_missed` to the executor (a
  ``SyncCallback``: no triggerer needed);
* the DAG's ``on_failure_callback`` (:func:`run_failed`): a run that ends failed;
* the lag: the report task calls :func:`alert_on_lag` with the lag it just measured. It alerts
  when the lag goes above ``max_lag`` (the previous recorded run's was at or below it, or there is
  none), not on every run while it stays above; with ``repeat_every``, again each time the lag
  has stayed above for another ``repeat_every``.

Each alert goes to the SMTP provider's ``SmtpNotifier`` (``alerts.email`` through
``alerts.smtp_conn_id``) and/or to any Airflow notifier named by ``alerts.notifier`` (``class``
and ``kwargs``: Slack's, Teams', PagerDuty's...). Their templated fields see the Airflow context
and ``alert``: ``kind`` (failure, deadline, lag), ``title``, ``text``, ``run_id``, ``dag_id``.
"""

from __future__ import annotations

import html
import importlib
import logging
import re
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from include.config import Alerts, Settings, parse_alerts, read_config_text
from include.errors import ConfigError
from include.operations.links import DAG_ID, configured_base_url, dag_run_link
from include.operations.report import LagBefore

log = logging.getLogger(__name__)

SUBJECT = "{{ alert.title }}"
BODY = "<p>{{ alert.html }}</p>"
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def load_alerts() -> Alerts | None:
    """The ``alerts:`` section of ``TRIGGERS_CONFIG`` (None when absent), and only it: a mistake
    elsewhere in the file is the tasks' to report, never a reason to lose the DAG or its alerts.
    Read at DAG parse time and in each callback: no database, no template check."""
    path = Settings.from_env().config_path
    return parse_alerts(read_config_text(path), source=path.name)


def _callback_alerts(kind: str) -> Alerts | None:
    """The section as a callback reads it: one that cannot be read is logged (why, and the alert
    lost) instead of raising an error that would hide the run's own."""
    try:
        return load_alerts()
    except ConfigError as error:
        log.error("the %s alert cannot be sent: the alerts section cannot be read: %s", kind, error)
        return None


def dag_alert_arguments(alerts: Alerts | None) -> dict[str, Any]:
    """The ``@dag`` arguments that arm the alerts: ``deadline`` and ``on_failure_callback``."""
    if alerts is None:
        return {}
    arguments: dict[str, Any] = {}
    if alerts.on_failure:
        arguments["on_failure_callback"] = run_failed
    if alerts.run_deadline:
        from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

        arguments["deadline"] = DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(seconds=alerts.run_deadline),
            callback=SyncCallback(deadline_missed, kwargs={"deadline_seconds": alerts.run_deadline}),
            name="triggers_run_deadline",
        )
    return arguments


def notifiers(alerts: Alerts) -> list[Any]:
    """The configured notifiers, new for each alert (a notifier renders its fields in place)."""
    found: list[Any] = []
    if alerts.email:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        found.append(
            SmtpNotifier(
                to=list(alerts.email),
                from_email=alerts.from_email,
                smtp_conn_id=alerts.smtp_conn_id,
                subject=SUBJECT,
                html_content=BODY,
            )
        )
    if alerts.notifier is not None:
        found.append(_custom_notifier(alerts.notifier.class_path, alerts.notifier.kwargs))
    return found


def _custom_notifier(class_path: str, kwargs: Mapping[str, Any]) -> Any:
    from airflow.sdk import BaseNotifier

    module_name, _, name = class_path.rpartition(".")
    try:
        notifier_class = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"alerts.notifier.class: cannot import {class_path!r} ({error}); install its provider "
            "(e.g. apache-airflow-providers-slack) or fix the path"
        ) from None
    if not (isinstance(notifier_class, type) and issubclass(notifier_class, BaseNotifier)):
        raise ConfigError(
            f"alerts.notifier.class: {class_path!r} is not an Airflow notifier (a BaseNotifier)"
        )
    try:
        return notifier_class(**kwargs)
    except TypeError as error:
        raise ConfigError(f"alerts.notifier.kwargs: {class_path} refuses them: {error}") from None


def send_alert(
    alerts: Alerts, kind: str, title: str, text: str, context: Mapping[str, Any], *, strict: bool
) -> int:
    """Tell every configured notifier; return how many were told. A notifier that fails is logged
    (its error, never its settings) and, when ``strict``, raised once the others were tried."""
    alert = {
        "kind": kind,
        "title": title,
        "text": text,
        "html": html.escape(text),
        "run_id": _run_id(context),
    }
    alert["dag_id"] = DAG_ID
    errors: list[str] = []
    told = 0
    for notifier in notifiers(alerts):
        try:
            notifier({**context, "alert": alert})
            told += 1
        except Exception as error:  # noqa: BLE001 - one notifier down must not silence the others
            # a webhook's URL holds its secret: no URL goes to the log
            reason = _URL.sub("<url>", str(error))[:500]
            errors.append(f"{type(notifier).__name__}: {type(error).__name__}: {reason}")
    for error in errors:
        log.error("the %s alert %r could not be sent by %s", kind, title, error)
    if errors and strict:
        raise RuntimeError(f"the {kind} alert could not be sent: {'; '.join(errors)}")
    if told:
        log.warning("%s alert sent to %d notifier(s): %s", kind, told, title)
    return told


def run_failed(context: Mapping[str, Any]) -> None:
    """The DAG's ``on_failure_callback``: the run ended failed."""
    alerts = _callback_alerts("failure")
    if alerts is None or not alerts.on_failure:
        return
    run_id = _run_id(context)
    reason = context.get("reason") or "a task failed"
    title = f"{DAG_ID} run {run_id} failed"
    text = f"{title}: {reason}. {_run_link(run_id)}"
    send_alert(alerts, "failure", title, text, context, strict=True)


def deadline_missed(context: Mapping[str, Any], deadline_seconds: float | None = None) -> None:
    """The Deadline Alert's callback (run by an executor): the run is still not finished."""
    alerts = _callback_alerts("deadline")
    if alerts is None:
        return
    run = context.get("dag_run") or {}
    run_id = _run_id(context)
    limit = f"{deadline_seconds:g} s" if deadline_seconds else "its deadline"
    title = f"{DAG_ID} run {run_id} has not finished {limit} after it was queued"
    text = f"{title} (state {run.get('state', '?')}). {_run_link(run_id)}"
    send_alert(alerts, "deadline", title, text, context, strict=True)


def lag_alert_due(alerts: Alerts, lag_seconds: float, now: float, before: LagBefore | None) -> bool:
    """Whether this run's lag is news: above ``max_lag`` while the previous run's was not (or no
    run before), or, with ``repeat_every``, above it for another ``repeat_every`` since the first
    run above it (a multiple of it reached between the previous run and this one)."""
    if alerts.max_lag is None or lag_seconds <= alerts.max_lag:
        return False
    if before is None or before.lag_seconds is None or before.lag_seconds <= alerts.max_lag:
        return True
    if not alerts.repeat_every or before.above_since is None or before.finished_at is None:
        return False
    every = alerts.repeat_every
    return (now - before.above_since) // every > (before.finished_at - before.above_since) // every


def alert_on_lag(
    alerts: Alerts | None,
    lag_seconds: float,
    context: Mapping[str, Any],
    before: LagBefore | None = None,
    now: float | None = None,
) -> bool:
    """The report task's check: alert when the lag went above ``alerts.max_lag`` (``before``: the
    runs before this one, :func:`include.operations.report.lag_before`; None: no run before). A
    notifier that fails is logged, not raised: the run's work is done and recorded. True when an
    alert was sent."""
    if alerts is None or not lag_alert_due(alerts, lag_seconds, time.time() if now is None else now, before):
        return False
    run_id = _run_id(context)
    title = f"{DAG_ID}: the lag is {lag_seconds:,.0f} s (above {alerts.max_lag:g} s)"
    text = (
        f"{title}: the oldest staged event waiting for matching was received {lag_seconds:,.0f} s ago "
        f"(run {run_id}). {_run_link(run_id)}"
    )
    return send_alert(alerts, "lag", title, text, context, strict=False) > 0


def _run_id(context: Mapping[str, Any]) -> str:
    """The run's id: a DagRun in a task's or the DAG's callback context, the run as JSON (the
    API's DAGRunResponse: ``dag_run_id``) in a Deadline Alert's."""
    run = context.get("dag_run")
    if isinstance(run, Mapping):
        return str(run.get("dag_run_id") or run.get("run_id") or "?")
    return str(getattr(run, "run_id", None) or "?")


def _run_link(run_id: str | None) -> str:
    """The run's page in the Airflow UI, when ``[api] base_url`` is set."""
    base = configured_base_url()
    if not base or run_id in (None, "?"):
        return ""
    return f"See {dag_run_link(base, str(run_id), DAG_ID)}"
