"""Every DAG file imports cleanly, without touching the network or a database, and follows our shape."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def dag_bag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    real_connect = socket.socket.connect

    def refuse(self, address):  # parsing a DAG must never open a connection
        raise AssertionError(f"a DAG file opened a connection to {address} at parse time")

    socket.socket.connect = refuse
    try:
        from airflow.dag_processing.dagbag import DagBag

        return DagBag(dag_folder=str(ROOT / "dags"))
    finally:
        socket.socket.connect = real_connect


def test_no_import_errors(dag_bag):
    assert dag_bag.import_errors == {}
    assert {"triggers_pipeline", "triggers_purge", "triggers_feedback"} <= set(dag_bag.dag_ids)


# the journal client retries for retry_validity and the next run drains again: no Airflow retries
NOT_RETRIED = {("triggers_pipeline", "authenticate"), ("triggers_pipeline", "drain")}


def test_every_dag_has_tags_docs_retries_timeouts_and_no_catchup(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.catchup is False, dag_id
        for task in dag.tasks:
            name = f"{dag_id}.{task.task_id}"
            assert task.retries == 0 if (dag_id, task.task_id) in NOT_RETRIED else task.retries >= 2, name
            assert task.execution_timeout is not None and task.execution_timeout.total_seconds() > 0, name


def test_task_timeouts_are_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIGGERS_DELIVER_TIMEOUT", "42")
    monkeypatch.setenv("TRIGGERS_PURGE_TIMEOUT", "43")
    from airflow.dag_processing.dagbag import DagBag

    dags = DagBag(dag_folder=str(ROOT / "dags")).dags
    assert dags["triggers_pipeline"].get_task("deliver").execution_timeout.total_seconds() == 42
    assert dags["triggers_purge"].get_task("purge_expired_rows").execution_timeout.total_seconds() == 43


def test_one_failed_stage_stops_no_other_and_fails_the_run(dag_bag):
    dag = dag_bag.dags["triggers_pipeline"]
    for task_id in ("match", "deliver", "report"):
        assert dag.get_task(task_id).trigger_rule == "all_done", task_id
    last = dag.get_task("all_stages_succeeded")
    assert last.trigger_rule == "all_success"
    assert last.upstream_task_ids == {"authenticate", "drain", "match", "deliver", "report"}


def test_pipeline_runs_one_at_a_time_on_a_configurable_schedule(dag_bag, monkeypatch):
    dag = dag_bag.dags["triggers_pipeline"]
    assert dag.max_active_runs == 1
    assert [t.task_id for t in dag.topological_sort()] == [
        "authenticate",
        "drain",
        "match",
        "deliver",
        "report",
        "all_stages_succeeded",
    ]
    # a data-interval timetable: scheduled and backfilled runs get real intervals, not zero-width ones
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == os.environ.get("TRIGGERS_SCHEDULE", "* * * * *")


def test_a_bad_timeout_setting_is_named(monkeypatch):
    import runpy

    monkeypatch.setenv("TRIGGERS_MATCH_TIMEOUT", "ten minutes")
    with pytest.raises(ValueError, match="TRIGGERS_MATCH_TIMEOUT is 'ten minutes'"):
        runpy.run_path(str(ROOT / "dags" / "triggers_pipeline.py"))


def test_the_feedback_dag_reads_the_mailbox_one_run_at_a_time_on_its_own_schedule(dag_bag, monkeypatch):
    dag = dag_bag.dags["triggers_feedback"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert [t.task_id for t in dag.tasks] == ["read_bounce_mailbox"]
    assert dag.timetable.expression == os.environ.get("TRIGGERS_FEEDBACK_SCHEDULE", "*/5 * * * *")
    assert dag.get_task("read_bounce_mailbox").execution_timeout.total_seconds() == 600

    import runpy

    monkeypatch.setenv("TRIGGERS_FEEDBACK_SCHEDULE", "*/2 * * * *")
    monkeypatch.setenv("TRIGGERS_FEEDBACK_TIMEOUT", "90")
    reloaded = runpy.run_path(str(ROOT / "dags" / "triggers_feedback.py"))["feedback_dag"]
    assert reloaded.timetable.expression == "*/2 * * * *"
    assert reloaded.get_task("read_bounce_mailbox").execution_timeout.total_seconds() == 90
    monkeypatch.setenv("TRIGGERS_FEEDBACK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TRIGGERS_FEEDBACK_TIMEOUT is 'soon'"):
        runpy.run_path(str(ROOT / "dags" / "triggers_feedback.py"))


def test_a_mistake_outside_the_alerts_section_leaves_the_dag_and_its_alerts(monkeypatch, tmp_path):
    """Only ``alerts:`` is read at parse time: a campaign's typo is the tasks' to report."""
    from airflow.dag_processing.dagbag import DagBag

    from include.config import DEFAULT_CONFIG_PATH

    config = tmp_path / "triggers.yaml"
    config.write_text(
        DEFAULT_CONFIG_PATH.read_text()
        + "limts: {}\nalerts: {email: [oncall@example.com], run_deadline: 10m}\n"  # "limts": a typo
    )
    monkeypatch.setenv("TRIGGERS_CONFIG", str(config))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["triggers_pipeline"]
    assert dag.on_failure_callback and dag.deadline is not None


def test_a_bad_audience_timeout_is_named(monkeypatch):
    import runpy

    from include.errors import AudienceError

    monkeypatch.setenv("TRIGGERS_AUDIENCE_TIMEOUT", "an hour")
    with pytest.raises(AudienceError, match="TRIGGERS_AUDIENCE_TIMEOUT is 'an hour'"):
        runpy.run_path(str(ROOT / "dags" / "audience_sync.py"))
