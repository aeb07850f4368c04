"""The DAGs' schedules come from the environment: a cron expression or a duration; a bad value
fails the DAG's import with an error naming the setting."""

from __future__ import annotations

import runpy
from datetime import timedelta

import pytest

from include.errors import ConfigError
from tests.conftest import ROOT


def dag_of(file: str, name: str):
    return runpy.run_path(str(ROOT / "dags" / file))[name]


def test_a_duration_gives_the_pipeline_a_sub_minute_cadence_one_run_at_a_time(monkeypatch) -> None:
    monkeypatch.setenv("TRIGGERS_SCHEDULE", "30s")
    dag = dag_of("triggers_pipeline.py", "triggers_pipeline_dag")
    assert type(dag.timetable).__name__ == "DeltaDataIntervalTimetable"
    assert dag.timetable.delta == timedelta(seconds=30)
    assert dag.max_active_runs == 1 and dag.catchup is False


def test_a_bad_schedule_fails_the_import_naming_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("TRIGGERS_SCHEDULE", "every 30 seconds")
    with pytest.raises(ConfigError, match="TRIGGERS_SCHEDULE is 'every 30 seconds': write a cron expression"):
        dag_of("triggers_pipeline.py", "triggers_pipeline_dag")


def test_the_audience_sync_runs_hourly_unless_told_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("TRIGGERS_AUDIENCE_SCHEDULE", raising=False)
    dag = dag_of("audience_sync.py", "audience_sync_dag")
    assert (
        type(dag.timetable).__name__ == "CronDataIntervalTimetable"
        and dag.timetable.expression == "0 * * * *"
    )
    assert dag.max_active_runs == 1 and dag.params["force_removals"] is False
    monkeypatch.setenv("TRIGGERS_AUDIENCE_SCHEDULE", "15m")
    assert dag_of("audience_sync.py", "audience_sync_dag").timetable.delta == timedelta(minutes=15)
