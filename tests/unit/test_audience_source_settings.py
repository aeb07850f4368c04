"""audience_sync's settings and how a database value becomes the text the CSV path would read."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from include.audience.source import AudienceSource, as_text
from include.errors import AudienceError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        (float("nan"), ""),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (101, "101"),
        (101.0, "101"),  # a number column with NULLs comes back as a float in some drivers
        (1.5, "1.5"),
        (Decimal("42"), "42"),
        (b"caf\xc3\xa9", "café"),
        (b"\xff", "\ufffd"),
        (memoryview(b"x"), "x"),
        (datetime(2026, 1, 5, 12, 0), "2026-01-05 12:00:00"),
        (" r1 ", " r1 "),  # stripped later, as the CSV's values are
    ],
)
def test_a_database_value_reads_as_the_csv_would_give_it(value, expected) -> None:
    assert as_text(value) == expected


def test_the_settings_and_their_defaults(monkeypatch, tmp_path) -> None:
    for name in ("CONN_ID", "SQL", "SQL_FILE", "CHUNK_SIZE", "MAX_REMOVED_SHARE"):
        monkeypatch.delenv(f"TRIGGERS_AUDIENCE_{name}", raising=False)
    assert AudienceSource.from_env() == AudienceSource(None, None, 50_000, 0.1)
    query = tmp_path / "audience.sql"
    query.write_text("SELECT 1 AS recipient_id, 'a@example.com' AS email")
    monkeypatch.setenv("TRIGGERS_AUDIENCE_CONN_ID", "crm")
    monkeypatch.setenv("TRIGGERS_AUDIENCE_SQL_FILE", str(query))
    monkeypatch.setenv("TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE", "0.25")
    assert AudienceSource.from_env() == AudienceSource("crm", query.read_text(), 50_000, 0.25)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE", "1.5", "between 0 and 1"),
        ("TRIGGERS_AUDIENCE_MAX_REMOVED_SHARE", "ten percent", "between 0 and 1"),
        ("TRIGGERS_AUDIENCE_CHUNK_SIZE", "0", "between 1 and 10,000,000"),
        ("TRIGGERS_AUDIENCE_SQL_FILE", "/nonexistent/audience.sql", "cannot read the audience query file"),
    ],
)
def test_a_bad_setting_is_named(monkeypatch, name, value, message) -> None:
    monkeypatch.delenv("TRIGGERS_AUDIENCE_SQL", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(AudienceError, match=message):
        AudienceSource.from_env()


def test_a_query_and_a_query_file_together_are_refused(monkeypatch) -> None:
    monkeypatch.setenv("TRIGGERS_AUDIENCE_SQL", "SELECT 1")
    monkeypatch.setenv("TRIGGERS_AUDIENCE_SQL_FILE", "audience.sql")
    with pytest.raises(AudienceError, match="not both"):
        AudienceSource.from_env()


@pytest.mark.parametrize("value", ["an hour", "0", "-5", "nan", "inf"])
def test_a_bad_sync_timeout_is_named_with_its_range(monkeypatch, value) -> None:
    from include.audience.source import timeout_setting

    monkeypatch.setenv("TRIGGERS_AUDIENCE_TIMEOUT", value)
    with pytest.raises(AudienceError, match=r"TRIGGERS_AUDIENCE_TIMEOUT is .*between 1 and 604,800"):
        timeout_setting()
    monkeypatch.setenv("TRIGGERS_AUDIENCE_TIMEOUT", "90")
    assert timeout_setting() == 90
