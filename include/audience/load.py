"""The audience: load ``recipients`` from CSV (SPEC section 5) and tell valid addresses apart.

``python -m include.cli audience load PATH`` upserts the file in chunks, in one transaction
(a file that cannot be read loads nothing). Rows are rejected, counted and reported by line
when they have no ``recipient_id``, hold a NUL character, repeat a ``recipient_id``, give an
``opted_out`` that is not a boolean,
claim a ``shopper_id``/``mc_id`` that another recipient holds, or give a ``timezone`` that is not
an IANA name (empty: ``limits.default_timezone``). A row with an invalid email
is loaded (matching suppresses it as ``invalid_email``) and counted in the report.
``AudienceLoad`` is that validation, whatever the source (``source`` feeds it query rows).
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, text

from include.config import check_timezone
from include.database.schema import recipients
from include.database.sql import bulk_write, in_list, list_param
from include.errors import AudienceError

# One @, a dot in the domain, no empty label, nothing that could split or forge a header.
EMAIL_PATTERN = r"[^@\s,;:<>()\[\]\"\\\x00-\x1f\x7f]+@(?:[^@\s,;:<>()\[\]\"\\\x00-\x1f\x7f.]+\.)+[^@\s,;:<>()\[\]\"\\\x00-\x1f\x7f.]+"
_EMAIL = re.compile(EMAIL_PATTERN)
CSV_COLUMNS = (
    "recipient_id",
    "email",
    "first_name",
    "last_name",
    "locale",
    "shopper_id",
    "mc_id",
    "opted_out",
    "timezone",
)
REQUIRED_COLUMNS = ("recipient_id", "email")
UNIQUE_IDENTITIES = ("shopper_id", "mc_id")
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})
EXAMPLES_KEPT = 10


def email_is_valid(emails: pd.Series) -> pd.Series:
    """Whether each address is usable: a syntax check, False for missing ones (a comprehension:
    ~10x pandas' ``.str`` on object columns)."""
    match = _EMAIL.fullmatch
    valid = [isinstance(email, str) and match(email) is not None for email in emails.tolist()]
    return pd.Series(valid, index=emails.index, dtype=bool)


def parse_opted_out(values: pd.Series) -> pd.Series:
    """true/false, 1/0, yes/no (any case) -> True/False; '' -> None; anything else -> NaN."""
    words = values.fillna("").astype(str).str.strip().str.lower()
    result = pd.Series(float("nan"), index=values.index, dtype=object)
    result[words.isin(TRUE_WORDS)] = True
    result[words.isin(FALSE_WORDS)] = False
    result[words == ""] = None
    return result


@functools.lru_cache(maxsize=4096)
def _known_timezone(name: str) -> bool:
    """Empty (the configured default) or an IANA name this machine's zoneinfo knows."""
    if name == "":
        return True
    try:
        check_timezone(name)
    except ValueError:
        return False
    return True


def _header(path: Path) -> list[str]:
    try:
        columns = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise AudienceError(f"cannot read the audience file {path}: {error}") from None
    return check_columns(columns, f"{path}", "header")


def check_columns(columns: Any, source: str, where: str) -> list[str]:
    """The column names (stripped), or AudienceError naming ``source`` when one is unknown,
    missing or repeated (``where``: "header" of a file, "columns" of a query)."""
    names = [str(c).strip() for c in columns]
    unknown = [n for n in names if n not in CSV_COLUMNS]
    missing = [n for n in REQUIRED_COLUMNS if n not in names]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        raise AudienceError(
            f"{source}: {' and '.join(problems)} in the {where}; the columns are {', '.join(CSV_COLUMNS)} "
            f"({', '.join(REQUIRED_COLUMNS)} required)"
        )
    if len(set(names)) != len(names):
        raise AudienceError(f"{source}: a column appears twice in the {where}: {', '.join(names)}")
    return names


class AudienceLoad:
    """The state of one load (a file, a query): what was seen, kept and rejected so far.

    ``unit`` names a source row in the examples: "line" of a file, "row" of a query.
    ``given_ids`` holds every recipient_id the source gave, loaded or rejected: a sync removes
    only recipients the source no longer has, not those whose row was rejected.
    """

    def __init__(self, conn: Connection, columns: list[str], unit: str = "line") -> None:
        self.conn = conn
        self.columns = columns
        self.unit = unit
        self.seen_ids: set[str] = set()
        self.given_ids: set[str] = set()
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []
        self.counts = Counter()

    def reject(self, chunk: pd.DataFrame, mask: pd.Series, reason: str, message: str) -> None:
        mask = mask & chunk["_reason"].isna()
        if not mask.any():
            return
        chunk.loc[mask, "_reason"] = reason
        self.reasons[reason] += int(mask.sum())
        for line, rid in zip(
            chunk.loc[mask, "_line"].tolist()[:EXAMPLES_KEPT],
            chunk.loc[mask, "recipient_id"].tolist(),
            strict=False,
        ):
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append(
                    f"{self.unit} {line}: {message}" + (f" (recipient_id {rid!r})" if rid else "")
                )

    def existing(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """Rows of ``recipients`` sharing a recipient_id, shopper_id or mc_id with the chunk."""
        wanted = {"ids": [v for v in chunk["recipient_id"].unique().tolist() if v]}
        conditions = [in_list(self.conn, "recipient_id", "ids")]
        for column in UNIQUE_IDENTITIES:
            if column in chunk:
                wanted[column] = [v for v in chunk[column].unique().tolist() if v]
                conditions.append(in_list(self.conn, column, column))
        sql = f"SELECT recipient_id, shopper_id, mc_id, opted_out FROM recipients WHERE {' OR '.join(conditions)}"
        rows = self.conn.execute(
            text(sql), {k: list_param(self.conn, v) for k, v in wanted.items()}
        ).fetchall()
        return pd.DataFrame.from_records(rows, columns=["recipient_id", "shopper_id", "mc_id", "opted_out"])

    def reject_taken_identities(self, chunk: pd.DataFrame, existing: pd.DataFrame) -> None:
        """A shopper_id or mc_id that belongs to another recipient, in the database or above."""
        ids = chunk["recipient_id"]
        for column in UNIQUE_IDENTITIES:
            if column not in chunk:
                continue
            values = chunk[column]
            # earlier chunks are already written in this transaction: the database knows them too
            in_db = existing[existing[column].notna()]
            holder = values.map(pd.Series(in_db["recipient_id"].to_numpy(), index=in_db[column].to_numpy()))
            taken = (values != "") & holder.notna() & (holder != ids)
            self.reject(chunk, taken, f"{column}_taken", f"{column} already belongs to another recipient")
            # two rows of this chunk claiming one value: the first keeps it
            open_values = values.where(chunk["_reason"].isna() & (values != ""))
            clash = open_values.notna() & open_values.duplicated()
            self.reject(chunk, clash, f"{column}_taken", f"{column} already given to another recipient above")

    def reject_unusable_rows(self, chunk: pd.DataFrame) -> None:
        """No recipient_id, a NUL character (no database stores it), or a recipient_id given above."""
        ids = chunk["recipient_id"]
        self.given_ids.update(ids[ids != ""].tolist())
        self.reject(chunk, ids == "", "missing_recipient_id", "no recipient_id")
        nul = chunk[self.columns].apply(lambda column: column.str.contains("\x00", regex=False)).any(axis=1)
        self.reject(
            chunk, nul, "nul_character", "a value holds a NUL character, which databases cannot store"
        )
        repeated = ids.duplicated() | ids.isin(self.seen_ids)
        self.reject(
            chunk, repeated & (ids != ""), "duplicate_recipient_id", "recipient_id already given above"
        )

    def chunk(self, chunk: pd.DataFrame, first_line: int) -> None:
        chunk.columns = [str(c).strip() for c in chunk.columns]
        chunk = chunk.apply(lambda column: column.str.strip())
        chunk["_line"] = range(first_line, first_line + len(chunk))
        chunk["_reason"] = pd.Series(None, index=chunk.index, dtype=object)
        self.reject_unusable_rows(chunk)
        opted_out = (
            parse_opted_out(chunk["opted_out"])
            if "opted_out" in chunk
            else pd.Series(None, index=chunk.index, dtype=object)
        )
        self.reject(
            chunk,
            opted_out.isna() & chunk.get("opted_out", pd.Series("", index=chunk.index)).ne(""),
            "bad_opted_out",
            "opted_out is not true/false, 1/0 or yes/no",
        )
        if "timezone" in chunk:
            self.reject(
                chunk,
                ~chunk["timezone"].map(_known_timezone),
                "bad_timezone",
                "timezone is not an IANA name (e.g. Europe/Paris); leave it empty for limits.default_timezone",
            )
        existing = self.existing(chunk[chunk["_reason"].isna()])
        self.reject_taken_identities(chunk, existing)
        accepted = chunk[chunk["_reason"].isna()]
        self.counts["rejected"] += len(chunk) - len(accepted)
        if accepted.empty:
            return
        known = set(existing["recipient_id"].tolist())
        is_update = accepted["recipient_id"].isin(known)
        previous = existing.drop_duplicates("recipient_id").set_index("recipient_id")["opted_out"]
        # an empty or absent opted_out keeps what the recipient had: a reload never un-opts anyone out
        flag = opted_out[accepted.index]
        flag = flag.where(flag.notna(), accepted["recipient_id"].map(previous))
        flag = flag.where(flag.notna(), False).astype(bool)
        rows = accepted[[c for c in self.columns if c != "opted_out"]].replace("", None)
        rows["opted_out"] = flag
        rows["updated_at"] = time.time()
        if "email" in rows:
            self.counts["invalid_email"] += int((~email_is_valid(rows["email"])).sum())
        rows = rows.astype(object).where(rows.notna(), None)
        bulk_write(
            self.conn,
            recipients,
            list(rows.columns),
            list(rows.itertuples(index=False, name=None)),
            conflict="update",
        )
        self.counts["loaded"] += len(rows)
        self.counts["updated"] += int(is_update.sum())
        self.counts["inserted"] += int((~is_update).sum())
        self.seen_ids.update(accepted["recipient_id"].tolist())

    def report(self) -> dict[str, Any]:
        """{"loaded", "inserted", "updated", "rejected", "invalid_email", "reasons", "examples"}."""
        counts = self.counts
        return {
            **{name: counts[name] for name in ("loaded", "inserted", "updated", "rejected", "invalid_email")},
            "reasons": dict(self.reasons),
            "examples": self.examples,
        }


def load_recipients(engine: Engine, path: str | Path, *, chunk_size: int = 100_000) -> dict[str, Any]:
    """Upsert ``recipients`` from a CSV file with SPEC section 5's header names.

    Returns {"loaded", "inserted", "updated", "rejected", "invalid_email", "reasons": {reason:
    count}, "examples": ["line N: why", ...]}. Raises AudienceError when the file cannot be read
    or its header is wrong; then nothing is loaded.
    """
    path = Path(path)
    columns = _header(path)
    try:
        with engine.begin() as conn:
            load = AudienceLoad(conn, columns)
            reader = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                chunksize=chunk_size,
                encoding="utf-8-sig",
            )
            line = 2  # the header is line 1
            for chunk in reader:
                load.chunk(chunk, line)
                line += len(chunk)
    except (UnicodeDecodeError, pd.errors.ParserError) as error:
        raise AudienceError(f"cannot read the audience file {path}: {error}; nothing was loaded") from None
    return load.report()
