"""`python -m include.cli import`: an export is staged once, and only backfill runs process it."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select

from include.config import load_config
from include.database.schema import events_table
from include.matching.run import match_ready_events
from include.sandbox.simulator.events import EventFactory
from include.sandbox.simulator.options import SimulatorOptions
from include.staging.imports import import_export
from tests.conftest import upgrade_schema

START = 1_767_571_200.0  # 2026-01-05 00:00 UTC


def write_export(path, count: int) -> None:
    factory = EventFactory(SimulatorOptions(seed=3, malformed_share=0.02))
    step = 3600.0 / count
    lines = factory.render_events(np.arange(count), START + np.arange(count) * step, np.full(count, step))
    path.write_text("\n".join(lines) + "\nnot json at all\n")


def test_an_export_is_staged_once_and_waits_for_its_backfill(engine, tmp_path):
    config = load_config()
    upgrade_schema(engine, config.dimensions)
    export = tmp_path / "export.jsonl"
    write_export(export, 400)
    first = import_export(engine, config, str(export))
    again = import_export(engine, config, str(export))
    assert first["lines"] == again["lines"] == 401
    assert first["staged"] == 401 and again["staged"] == 0
    assert first["quarantined"] >= 1  # the line that is not JSON, at least

    table = events_table(config.dimensions)
    with engine.connect() as conn:
        positions = {p for (p,) in conn.execute(select(table.c.position).distinct())}
    assert positions == {"import"}

    now = START + 86_400  # every unless window has closed
    scheduled = match_ready_events(engine, config, now=now)
    assert scheduled.get("ready", 0) == 0  # a scheduled run leaves imported events to the backfill
    first_half = match_ready_events(engine, config, now=now, interval=(START, START + 1800))
    rest = match_ready_events(engine, config, now=now, interval=(START + 1800, START + 3600))
    with engine.connect() as conn:
        waiting = conn.execute(select(func.count()).where(table.c.status == "new")).scalar()
    assert first_half["ready"] > 0 and rest["ready"] > 0 and waiting == 0
