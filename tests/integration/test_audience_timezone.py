"""The audience's ``timezone`` column (SPEC sections 5, 9) on SQLite and PostgreSQL: an IANA name
is stored, empty is NULL (the configured default), anything else is rejected with its line."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from include.audience.load import load_recipients
from include.config import check_timezone
from include.errors import AudienceError
from tests.conftest import upgrade_schema

HEADER = "recipient_id,email,timezone\n"
_ids = itertools.count()


def zones(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT recipient_id, timezone FROM recipients")).all())


def test_timezones_are_checked_per_line(engine: Engine, tmp_path: Path) -> None:
    upgrade_schema(engine)
    path = tmp_path / "people.csv"
    path.write_text(
        HEADER + "r1,a@example.com,Europe/Paris\n"  # line 2
        "r2,b@example.com,\n"  # 3: the default
        "r3,c@example.com,Europe/Pariss\n"  # 4: unknown
        "r4,d@example.com, Pacific/Kiritimati \n"  # 5: trimmed
        "r5,e@example.com,../../etc/passwd\n",  # 6: not a name
        encoding="utf-8",
    )
    report = load_recipients(engine, path)
    assert report["loaded"] == 3 and report["reasons"] == {"bad_timezone": 2}
    assert [e.split(":")[0] for e in report["examples"]] == ["line 4", "line 6"]
    assert "IANA" in report["examples"][0] and "'r3'" in report["examples"][0]
    assert zones(engine) == {"r1": "Europe/Paris", "r2": None, "r4": "Pacific/Kiritimati"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_any_timezone_text_is_stored_or_rejected_never_lost(
    engine: Engine, tmp_path: Path, values: list[str]
) -> None:
    upgrade_schema(engine)
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # CRLF rows: a CR or LF inside a value is quoted
    writer.writerow(["recipient_id", "email", "timezone"])
    ids = [f"p{next(_ids)}" for _ in values]
    for rid, value in zip(ids, values, strict=True):
        writer.writerow([rid, f"{rid}@example.com", value.replace("\x00", "")])
    path = tmp_path / "people.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    try:
        report = load_recipients(engine, path)
    except AudienceError:  # a CSV the parser refuses: nothing loaded, the file named
        assert zones(engine).keys().isdisjoint(ids)
        return
    assert report["loaded"] + report["rejected"] == len(values)
    stored = zones(engine)
    for rid in ids:
        if rid in stored and stored[rid] is not None:
            assert check_timezone(stored[rid]) == stored[rid]  # only names zoneinfo knows are stored
