"""The stored pipeline host (``pipeline_state.pipeline_host``, shown by the status view) holds no
user, password or query, whatever the connection's URL carries; on SQLite and PostgreSQL."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import select

from include.database.schema import pipeline_state
from include.staging.drain import drain
from tests.conftest import upgrade_schema
from tests.unit.test_drain import ScriptedJournal, config


def test_the_stored_pipeline_host_holds_no_credentials(engine):
    upgrade_schema(engine, config().dimensions)
    journal = ScriptedJournal(6)
    journal.credentials = SimpleNamespace(
        pipeline_url="https://reader:s3cret@pipeline.test:8443/?token=s3cret"
    )
    assert drain(engine, config(), journal).staged == 6
    with engine.connect() as conn:
        stored = conn.execute(select(pipeline_state.c.pipeline_host)).scalar_one()
    assert stored == "pipeline.test:8443"
