"""Text columns as matching reads them: object Series, multi-valued dimensions and ``where`` conditions.

A dimension column holds the hit's values joined by ``VALUE_SEPARATOR``; the identity is its last
non-empty value, and a condition holds when any of its values satisfies it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from include.config import VALUE_SEPARATOR, Condition, dimension_column

# --- text columns ---------------------------------------------------------------------------


def objects(values: Any, index: pd.Index | None = None) -> pd.Series:
    """Strings as an object Series: no per-element check that pandas' str dtype would run."""
    return pd.Series(np.asarray(values, dtype=object), index=index, dtype=object, copy=False)


def text_column(values: pd.Series) -> pd.Series:
    """A text column with missing values as ''."""
    return objects(values.fillna("").to_numpy(dtype=object), values.index)


def empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: objects([]) for c in columns})


def each(function: Callable[[str], Any], values: pd.Series) -> list[Any]:
    """``function`` of each text: a comprehension is ~10x pandas' ``.str`` on object columns."""
    return [function(value) for value in values.tolist()]


def _last_of(value: str) -> str:
    if VALUE_SEPARATOR not in value:
        return value.strip()
    return next((part.strip() for part in reversed(value.split(VALUE_SEPARATOR)) if part.strip()), "")


def last_value(values: pd.Series) -> pd.Series:
    """The identity in a dimension column: its last non-empty value, stripped; '' when none."""
    values = text_column(values)
    # most values are single: no call for them
    return objects(
        [_last_of(v) if VALUE_SEPARATOR in v else v.strip() for v in values.tolist()], values.index
    )


def exploded(values: pd.Series) -> pd.Series:
    """One row per value, indexed like the rows they come from."""
    return text_column(values).str.split(VALUE_SEPARATOR).explode()


# --- conditions -------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _value_test(values: pd.Series, condition: Condition) -> np.ndarray:
    """Per single value: does it satisfy the condition (for ``ne``: does it equal the value)."""
    op, target = condition.op, condition.value
    if op == "exists":
        return np.array(each(str.strip, values), dtype=bool)
    elif op in ("eq", "ne"):
        result = values == _as_text(target)
    elif op == "in":
        result = values.isin([_as_text(v) for v in target])
    elif op == "startswith":
        prefix = _as_text(target)
        return np.array(each(lambda value: value.startswith(prefix), values), dtype=bool)
    elif op == "contains":
        part = _as_text(target)
        return np.array(each(lambda value: part in value, values), dtype=bool)
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        bound = float(target)
        with np.errstate(invalid="ignore"):
            return {
                "gt": numbers > bound,
                "ge": numbers >= bound,
                "lt": numbers < bound,
                "le": numbers <= bound,
            }[op]
    return np.array(result.fillna(False), dtype=bool)


def condition_holds(values: pd.Series, condition: Condition) -> pd.Series:
    """Whether a ``where`` condition holds for each row of a dimension column (any value)."""
    values = text_column(values)
    multi = np.array(each(lambda value: VALUE_SEPARATOR in value, values), dtype=bool)
    any_value = _value_test(values, condition)
    if multi.any():
        each_value = exploded(values[multi])
        hits = pd.Series(_value_test(each_value, condition), index=each_value.index).groupby(level=0).any()
        any_value[multi] = hits.reindex(values.index[multi], fill_value=False).to_numpy(dtype=bool)
    return pd.Series(~any_value if condition.op == "ne" else any_value, index=values.index)


def where_holds(events: pd.DataFrame, conditions: Iterable[Condition]) -> pd.Series:
    """Whether every condition holds, per event; a missing dimension has no value."""
    mask = np.ones(len(events), dtype=bool)
    for condition in conditions:
        column = dimension_column(condition.dimension)
        values = events[column] if column in events else objects([""] * len(events), events.index)
        mask &= condition_holds(values, condition).to_numpy(dtype=bool)
    return pd.Series(mask, index=events.index)
