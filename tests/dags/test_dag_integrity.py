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
    assert {"triggers_pipeline", "triggers_purge"} <= set(dag_bag.dag_ids)


def test_every_dag_has_tags_docs_retries_and_no_catchup(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.catchup is False, dag_id
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag_id}.{task.task_id}"


def test_pipeline_runs_one_at_a_time_on_a_configurable_schedule(dag_bag, monkeypatch):
    dag = dag_bag.dags["triggers_pipeline"]
    assert dag.max_active_runs == 1
    assert [t.task_id for t in dag.topological_sort()] == [
        "authenticate",
        "drain",
        "match",
        "deliver",
        "report",
    ]
    # a data-interval timetable: scheduled and backfilled runs get real intervals, not zero-width ones
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == os.environ.get("TRIGGERS_SCHEDULE", "* * * * *")
