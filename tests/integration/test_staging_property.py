"""The staging write takes anything a page can carry (issue 12), on SQLite and PostgreSQL:
hypothesis pages of arbitrary JSON values and bytes (tests/unit/test_parser_hostile.py) are parsed
and written without an error, and every event is stored exactly once by its identity."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from sqlalchemy import delete, select

from include.staging.stager import Stager
from tests.conftest import upgrade_schema
from tests.unit.test_parser_hostile import CONFIG, NOW, hostile_pages, page_of


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=hostile_pages)
def test_any_page_is_staged_or_quarantined_once_per_event(engine, items: list[bytes]) -> None:
    table = upgrade_schema(engine, CONFIG.dimensions)  # once: later calls find it done
    stager = Stager(engine, CONFIG)
    page = stager.parser.parse_page(page_of(items), NOW)
    staged, _refused = stager.store(page)
    first_position: dict[str, str] = {}
    for event_id, position in zip(page.values[0], page.values[1], strict=True):
        first_position.setdefault(event_id, position)
    with engine.begin() as conn:
        stored = dict(conn.execute(select(table.c.event_id, table.c.position)).all())
        conn.execute(delete(table))
    assert staged == len(stored) == len(first_position)
    assert stored == first_position  # each event once, at the position it first came at
