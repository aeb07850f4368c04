"""Loading the audience from CSV (SPEC section 5) on SQLite and PostgreSQL, and the CLI command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from include import cli
from include.audience.load import email_is_valid, load_recipients, parse_opted_out
from include.errors import AudienceError
from tests.conftest import upgrade_schema

HEADER = "recipient_id,email,first_name,last_name,locale,shopper_id,mc_id,opted_out\n"


@pytest.fixture
def engine(engine: Engine) -> Engine:
    """conftest's engine, on a database at the code's schema."""
    upgrade_schema(engine)
    return engine


def write(path: Path, body: str, header: str = HEADER) -> Path:
    path.write_text(header + body, encoding="utf-8")
    return path


def table(engine: Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        frame = pd.read_sql(text("SELECT * FROM recipients ORDER BY recipient_id"), conn)
    frame["opted_out"] = frame["opted_out"].astype(bool)
    return frame.set_index("recipient_id")


def test_load_inserts_validates_and_reports_rejections_by_line(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path / "people.csv",
        "r1,ann@example.com,Ann,Lee,fr_FR,S1,MC1,false\n"  # line 2
        " r2 , bob@example.com ,Bob,,,S2,,YES\n"  # 3: trimmed, opted out
        ",nobody@example.com,,,,,,\n"  # 4: no id
        "r1,again@example.com,,,,,,\n"  # 5: duplicate id
        "r3,cid@example.com,,,,,,maybe\n"  # 6: bad flag
        "r4,dan@example.com,,,,S1,,0\n"  # 7: S1 is r1's
        "r5,not an address,,,,S5,MC5,\n"  # 8: loaded, invalid email
        "r6,eve@example.com,,,,,MC5,no\n",  # 9: MC5 is r5's
    )
    report = load_recipients(engine, path, chunk_size=3)  # chunks split the duplicates apart
    assert report["loaded"] == 3 and report["inserted"] == 3 and report["updated"] == 0
    assert report["rejected"] == 5
    assert report["reasons"] == {
        "missing_recipient_id": 1,
        "duplicate_recipient_id": 1,
        "bad_opted_out": 1,
        "shopper_id_taken": 1,
        "mc_id_taken": 1,
    }
    assert report["invalid_email"] == 1
    assert any(e.startswith("line 4:") for e in report["examples"])
    assert any(e.startswith("line 7:") and "shopper_id" in e and "'r4'" in e for e in report["examples"])
    people = table(engine)
    assert people.index.tolist() == ["r1", "r2", "r5"]
    assert people.loc["r1", ["email", "first_name", "locale", "shopper_id", "mc_id"]].tolist() == [
        "ann@example.com",
        "Ann",
        "fr_FR",
        "S1",
        "MC1",
    ]
    assert people.loc["r2", "email"] == "bob@example.com" and people.loc["r2", "opted_out"]
    assert pd.isna(people.loc["r2", "last_name"]) and pd.isna(people.loc["r2", "mc_id"])  # '' is NULL
    assert people.loc["r5", "email"] == "not an address" and not people.loc["r5", "opted_out"]


def test_reload_updates_and_never_clears_an_opt_out_silently(engine: Engine, tmp_path: Path) -> None:
    load_recipients(
        engine,
        write(tmp_path / "a.csv", "r1,ann@example.com,Ann,,,S1,MC1,true\nr2,bob@example.com,,,,S2,,false\n"),
    )
    # a file without the opted_out column, and a row with it empty: the flags stay
    report = load_recipients(
        engine,
        write(
            tmp_path / "b.csv",
            "r1,ann@new.example,Annie,S9\nr3,cid@example.com,,\n",
            header="recipient_id,email,first_name,shopper_id\n",
        ),
    )
    assert (report["inserted"], report["updated"], report["rejected"]) == (1, 1, 0)
    people = table(engine)
    assert people.loc["r1", ["email", "first_name", "shopper_id", "mc_id"]].tolist() == [
        "ann@new.example",
        "Annie",
        "S9",
        "MC1",
    ]
    assert people.loc["r1", "opted_out"] and not people.loc["r3", "opted_out"]
    load_recipients(engine, write(tmp_path / "c.csv", "r1,ann@new.example,,,,,,\n"))
    assert table(engine).loc["r1", "opted_out"]
    # a shopper id freed by its owner may be given to someone else in a later load
    report = load_recipients(engine, write(tmp_path / "d.csv", "r2,bob@example.com,,,,S1,,false\n"))
    assert report["loaded"] == 1 and table(engine).loc["r2", "shopper_id"] == "S1"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("recipient_id,mail\n", "unknown column(s) mail"),
        ("email,first_name\n", "missing column(s) recipient_id"),
        ("", "cannot read the audience file"),
    ],
)
def test_a_bad_header_is_a_clear_error_and_loads_nothing(
    engine: Engine, tmp_path: Path, header: str, expected: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(header + ("r1,x@example.com\n" if header else ""))
    with pytest.raises(AudienceError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_recipients(engine, path)


def test_a_malformed_row_fails_the_whole_load(engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "broken.csv", "r1,ann@example.com,,,,,,\n" * 3 + 'r2,"unterminated\n')
    path.write_text(path.read_text() + "r3,a@b.co,x,y,z,w,v,u,extra,extra\n")
    with pytest.raises(AudienceError, match="nothing was loaded"):
        load_recipients(engine, path, chunk_size=1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM recipients")).scalar_one() == 0


def test_the_cli_command_loads_and_prints_the_report(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIGGERS_DB_URL", db_url)
    assert cli.main(["db", "upgrade"]) == 0
    path = write(tmp_path / "people.csv", "r1,ann@example.com,,,,,,\n,x@example.com,,,,,,\n")
    assert cli.main(["audience", "load", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 loaded (1 new, 0 updated), 1 rejected" in out
    assert "missing_recipient_id" in out and "line 3" in out
    assert cli.main(["audience", "load", str(tmp_path / "missing.csv")]) == 1
    assert "cannot read the audience file" in capsys.readouterr().err


def test_email_syntax_and_opted_out_words() -> None:
    emails = pd.Series(
        [
            "a@b.co",
            "first.last+tag@sub.example.org",
            None,
            "",
            "a@b",
            "a b@c.de",
            "a@@b.de",
            "a@b.de\r\nBcc: x@y.z",
            "a,b@c.de",
            "<a@b.de>",
            "a@.de",
            "a@b..de",
        ]
    )
    assert email_is_valid(emails).tolist() == [True, True] + [False] * 10
    flags = parse_opted_out(pd.Series(["true", "FALSE", "1", "0", "Yes", "no", "", "maybe"]))
    assert flags.tolist()[:7] == [True, False, True, False, True, False, None]
    assert pd.isna(flags.iloc[7])
