"""Overlapping matching runs (a manual run beside the schedule, two schedulers, a backfill) take
turns on the database's run lock: together they write exactly the deliveries of one run.

Without the lock, the second run's later batches count an earlier event twice (once as the
first run's committed row, once as its own decision) and the frequency cap suppresses emails
that one run sends; the cap here (2 a day, with two campaigns deduped daily) binds only then.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.bench_matching import CONFIG, T0, prepare
from include.database.engine import make_engine
from include.database.schema import deliveries
from tests.conftest import ROOT, new_database_url

pytestmark = pytest.mark.slow

EVENTS = 20_000
BATCH = 500  # many small batches, so that the two runs interleave
OVERLAP_CONFIG = CONFIG.replace("max: 3, per: 24h", "max: 2, per: 24h")
MATCH_SCRIPT = """
import sys
from include.config import parse_config
from include.database.engine import make_engine
from include.matching.run import match_ready_events
url, config, now, interval, batch = sys.argv[1:]
window = None if interval == "-" else tuple(float(v) for v in interval.split(","))
print(match_ready_events(make_engine(url), parse_config(config), now=float(now), interval=window,
                         batch_size=int(batch)))
"""
NOW = T0 + 3 * 86_400.0
WHOLE_DAY = f"{T0 - 1},{T0 + 86_401}"


def start_match(url: str, interval: str = "-") -> subprocess.Popen[str]:
    """A match process as a task or the CLI starts it: scheduled (``-``) or a backfill interval."""
    return subprocess.Popen(
        [sys.executable, "-c", MATCH_SCRIPT, url, OVERLAP_CONFIG, str(NOW), interval, str(BATCH)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def decided(url: str) -> set[tuple[str, str, str | None]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.delivery_id, deliveries.c.status, deliveries.c.reason)).all()
    engine.dispose()
    return {tuple(row) for row in rows}


@pytest.mark.parametrize("second", ["scheduled", "backfill"])
def test_two_match_processes_at_once_write_the_deliveries_of_one_run(db_url, tmp_path: Path, second):
    kind = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    (tmp_path / "single").mkdir()
    single_urls = new_database_url(kind, tmp_path / "single")
    single_url = next(single_urls)
    try:
        prepare(single_url, EVENTS)
        finish(start_match(single_url))
        one_run = decided(single_url)
    finally:
        single_urls.close()  # drops the PostgreSQL copy

    prepare(db_url, EVENTS)
    first = start_match(db_url)
    other = start_match(db_url, WHOLE_DAY if second == "backfill" else "-")
    finish(first), finish(other)
    together = decided(db_url)

    assert sum(status == "pending" for _, status, _ in one_run) > 1000
    assert together == one_run, (
        f"{len(together - one_run)} decisions differ from one run's, e.g. {sorted(together - one_run)[:3]}"
    )
