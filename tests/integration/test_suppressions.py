"""The suppression list on SQLite and PostgreSQL: the store, the CSV import (good lines written,
bad ones reported by number, nothing lost), the export, and the ``suppressions`` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from include.config import load_config
from include.errors import SuppressionFileError
from include.suppressions.commands import ImportReport, export_csv, import_file, read_suppressions
from include.suppressions.store import (
    Suppression,
    add,
    add_many,
    counts_by_reason,
    listed,
    reasons_for,
    remove,
    suppressed_reason,
)
from tests.conftest import upgrade_schema

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def schema(engine: Engine) -> Engine:
    upgrade_schema(engine, load_config().dimensions)
    return engine


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM suppressions")).scalar_one())


def test_store_adds_once_scopes_and_removes(schema: Engine) -> None:
    with schema.begin() as conn:
        assert add(conn, [Suppression(" Ann@Example.com ", "unsubscribed", source="one-click d1")]) == 1
        assert add(conn, [Suppression("ann@example.com", "complaint")]) == 0  # the first reason stays
        assert add(conn, [Suppression("bob@example.com", "manual", campaign_id="cart")]) == 1
        assert add_many(conn, [Suppression("cid@example.com", "hard_bounce")] * 3) == 1
    with schema.connect() as conn:
        found = reasons_for(
            conn, ["ANN@example.com", "bob@example.com", "cid@example.com", "new@example.com"]
        )
        assert suppressed_reason(found, "ann@example.com", "browse") == "unsubscribed"
        assert suppressed_reason(found, "Bob@example.com", "cart") == "manual"
        assert suppressed_reason(found, "bob@example.com", "browse") is None  # one campaign only
        assert counts_by_reason(conn) == {"hard_bounce": 1, "manual": 1, "unsubscribed": 1}
        assert [(s.email, s.campaign_id) for s in listed(conn, reason="unsubscribed")] == [
            ("ann@example.com", "")
        ]
        assert next(iter(listed(conn, email="ANN@example.com"))).source == "one-click d1"
    with schema.begin() as conn:
        assert remove(conn, "ann@example.com") == 1 and remove(conn, "ann@example.com") == 0
        assert remove(conn, "bob@example.com") == 0  # its scope is 'cart'
    assert count(schema) == 2


CSV_TEXT = """email,campaign_id,reason,source,created_at
ann@example.com,,unsubscribed,ticket 1,2026-01-01T00:00:00Z
"Bob@Example.com",cart,,,
not an address,,manual,,
cid@example.com,,bounced,,
dan@example.com,bad id!,manual,,
eve@example.com,,manual,,yesterday
ann@example.com,,complaint,,
fay@example.com,,,
,,,,
gus@example.com,,hard_bounce,,1767225600
"""


def test_import_writes_good_lines_and_names_each_bad_one(schema: Engine, tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(CSV_TEXT)
    report = import_file(schema, path)
    assert report.summary() == {"lines": 9, "added": 3, "already_present": 1, "rejected": 5}
    errors = "\n".join(report.errors)
    assert "line 4: email 'not an address' is not one plain address" in errors
    assert "line 5: reason 'bounced' is not one of unsubscribed, hard_bounce, complaint, manual" in errors
    assert "line 6: campaign_id 'bad id!'" in errors and "line 7: created_at 'yesterday'" in errors
    assert "line 9: 4 cells where the header has 5" in errors
    with schema.connect() as conn:
        rows = {(s.email, s.campaign_id): s for s in listed(conn)}
    assert set(rows) == {("ann@example.com", ""), ("bob@example.com", "cart"), ("gus@example.com", "")}
    assert rows[("bob@example.com", "cart")].reason == "manual"  # --reason's default
    assert rows[("bob@example.com", "cart")].source == "import list.csv"
    assert rows[("ann@example.com", "")].created_at == 1_767_225_600.0
    assert import_file(schema, path).summary()["added"] == 0  # again: nothing changes
    out = io.StringIO()
    assert export_csv(schema, out) == 3
    path.write_text(out.getvalue())
    with schema.begin() as conn:
        conn.execute(text("DELETE FROM suppressions"))
    assert import_file(schema, path).summary() == {
        "lines": 3,
        "added": 3,
        "already_present": 0,
        "rejected": 0,
    }
    with schema.connect() as conn:
        again = {(s.email, s.campaign_id): s for s in listed(conn)}
    # the export round-trips (its times are ISO 8601 to the microsecond)
    assert {k: (v.reason, v.source, round(v.created_at or 0, 3)) for k, v in again.items()} == {
        k: (v.reason, v.source, round(v.created_at or 0, 3)) for k, v in rows.items()
    }


def test_a_file_that_cannot_be_read_names_the_fix(schema: Engine, tmp_path: Path) -> None:
    with pytest.raises(SuppressionFileError, match="readable CSV"):
        import_file(schema, tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("mail,why\nann@example.com,x\n")
    with pytest.raises(SuppressionFileError, match="include email; fix the first line"):
        import_file(schema, tmp_path / "bad.csv")


def test_a_large_import_is_written_in_bulk(schema: Engine, tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w") as out:
        out.write("email\n")
        out.writelines(f"person{i}@example.org\n" for i in range(120_000))
        out.write("broken\n")
    report = import_file(schema, path, default_reason="hard_bounce")
    assert report.summary() == {"lines": 120_001, "added": 120_000, "already_present": 0, "rejected": 1}
    assert report.errors == [
        "line 120002: email 'broken' is not one plain address (local@domain); correct it or delete the line"
    ]
    assert count(schema) == 120_000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_any_bytes_after_a_header_lose_no_line(schema: Engine, tmp_path: Path, body: bytes) -> None:
    """Each line of arbitrary bytes is written or reported; none raises, none is dropped silently."""
    report = ImportReport()
    stream = io.TextIOWrapper(
        io.BytesIO(b"email,reason,source\n" + body), encoding="utf-8", errors="surrogateescape", newline=""
    )
    items = list(read_suppressions(stream, report, "manual", "prop"))
    assert len(items) + report.rejected == report.lines
    assert all(error.startswith("line ") for error in report.errors)
    with schema.begin() as conn:
        add_many(conn, items)  # whatever was accepted is storable (no NUL, no lone surrogate)
        conn.execute(text("DELETE FROM suppressions"))


def cli(db_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRIGGERS_DB_URL": db_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "include.cli", "suppressions", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_the_command_adds_lists_imports_exports_and_removes(
    schema: Engine, db_url: str, tmp_path: Path
) -> None:
    added = cli(db_url, "add", "Ann@Example.com", "not-an-address", "--reason", "complaint")
    assert added.returncode == 1 and "address 2: email 'not-an-address'" in added.stderr
    assert "'added': 1" in added.stdout
    assert cli(db_url, "add", "bob@example.com", "--campaign", "cart").returncode == 0
    listing = cli(db_url, "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0] == "email,campaign_id,reason,source,created_at"
    assert ",".join(listing.stdout.splitlines()[1].split(",")[:4]) == "ann@example.com,,complaint,cli"
    (tmp_path / "in.csv").write_text("email,reason\ncid@example.com,hard_bounce\nnope,manual\n")
    imported = cli(db_url, "import", str(tmp_path / "in.csv"))
    assert imported.returncode == 1 and "line 3: email 'nope'" in imported.stderr
    exported = cli(db_url, "export", "--out", str(tmp_path / "out.csv"))
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "email",
        "ann@example.com",
        "bob@example.com",
        "cid@example.com",
    ]
    assert cli(db_url, "remove", "bob@example.com").stdout.strip() == "{'removed': 0, 'not_found': 1}"
    assert cli(db_url, "remove", "bob@example.com", "--campaign", "cart").stdout.strip() == (
        "{'removed': 1, 'not_found': 0}"
    )
    assert count(schema) == 2
