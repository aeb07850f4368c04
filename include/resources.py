"""What a task or a CLI command needs to start: settings, the configuration and an engine.

``with open_resources() as res:`` reads the environment (``Settings``), loads and validates the
configuration, makes the engine, checks that the database schema is current, and disposes of
the engine at the end. ``RunWindow`` is what a DAG run means for the stages: its "now", the data
interval of a backfill run, its id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from include.config import Settings, TriggersConfig, load_config
from include.database.engine import make_engine
from include.database.migrate import check_current


@dataclass(frozen=True)
class Resources:
    settings: Settings
    config: TriggersConfig
    engine: Engine


@contextmanager
def open_resources(*, check: bool = True) -> Iterator[Resources]:
    """Settings from the environment, the validated configuration, and an engine on a current
    schema (unless ``check`` is False: the command that upgrades it), disposed of on exit."""
    settings = Settings.from_env()
    config = load_config(settings.config_path, settings.templates_dir)
    engine = make_engine(settings.db_url)
    try:
        if check:
            check_current(engine, config.dimensions)
        yield Resources(settings, config, engine)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class RunWindow:
    """A DAG run as the stages see it.

    ``now`` is the end of the run's data interval, so that rerunning a run reproduces it; for a
    backfill run it is the real now: the interval's last events wait for ``unless`` windows
    that close after its end, and no later backfill run would take them. ``interval`` is the
    data interval of a backfill run (its events only), else None; ``end`` the end of the data
    interval, whatever the run.
    """

    now: float
    interval: tuple[float, float] | None
    run_id: str
    end: float

    @property
    def backfill(self) -> bool:
        return self.interval is not None

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> RunWindow:
        dag_run = context["dag_run"]
        end = context.get("data_interval_end") or dag_run.run_after
        start = context.get("data_interval_start") or end
        if str(dag_run.run_type).lower().endswith("backfill"):
            return cls(time.time(), (start.timestamp(), end.timestamp()), dag_run.run_id, end.timestamp())
        return cls(end.timestamp(), None, dag_run.run_id, end.timestamp())
