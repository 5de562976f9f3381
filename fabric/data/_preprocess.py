"""The fitted preprocessor: scaling of numeric columns and one-hot encoding of categorical ones.

It is fitted on the training split only (from the statistics the ingestion scan gathers), saved as
``preprocessor.json`` next to the data and with the model, and applied unchanged by the writer of
the splits and by serving replicas, so training and serving see the very same features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from fabric.errors import DataValidationError

FORMAT_VERSION = 1
MAX_EXAMPLES = 5
_STATS = ("mean", "std", "min", "max")


# --------------------------------------------------------------------------- category keys


def _key(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        return str(int(f)) if f.is_integer() and abs(f) < 2**63 else repr(f)
    if v is pd.NA or v is pd.NaT:
        return None
    return str(v)


def by_uniques(series: pd.Series, fn: Any, null: Any) -> np.ndarray:
    """``fn`` applied to each distinct value only, spread back over the rows (nulls become ``null``).

    Text columns are mostly categorical: a handful of distinct values over millions of rows, so this
    turns per-row Python work into per-category work.
    """
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    mapped = np.empty(len(uniques) + 1, dtype=object)
    mapped[:-1] = [fn(v) for v in uniques]
    mapped[-1] = null
    return mapped[codes]  # code -1 (null) picks the last slot


def category_keys(series: pd.Series) -> np.ndarray:
    """The string key of every value (None for nulls), so 3, 3.0 and "3" are the same category.

    Readers disagree on types (a CSV gives int64, a JSON request gives str or float); keying
    categories by a canonical string keeps training and serving in agreement.
    """
    return by_uniques(series, _key, None)


def sort_categories(keys: Iterable[str]) -> list[str]:
    """Numbers in numeric order first, then other strings in lexical order."""

    def order(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    return sorted(set(keys), key=order)


# --------------------------------------------------------------------------- examples


def json_value(v: Any) -> Any:
    """A JSON-safe Python value (numpy scalars unwrapped, NaN/NA as None)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def example_rows(df: pd.DataFrame, mask: np.ndarray, first: str | None = None, limit: int = MAX_EXAMPLES) -> list[dict]:
    """Up to ``limit`` rows of ``df`` where ``mask`` holds, as JSON-safe dicts.

    Wide rows are cut to 12 columns, keeping ``first`` (the offending column) in front.
    """
    idx = np.flatnonzero(mask)[:limit]
    if len(idx) == 0:
        return []
    cols = list(df.columns)
    if first in cols:
        cols.remove(first)
        cols.insert(0, first)
    cols = cols[:12]
    rows = df.iloc[idx][cols]
    return [{c: json_value(v) for c, v in zip(cols, r, strict=True)} for r in rows.itertuples(index=False)]


def _number(v: Any) -> float:
    # Booleans inside object columns (JSON true/false) count as 1/0, like a bool column.
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return math.nan


def numeric_values(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Float64 values of a column and a mask of values that are present but not numbers."""
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(
            len(series), dtype=bool
        )
    nums = by_uniques(series, _number, math.nan).astype(np.float64)
    return nums, series.notna().to_numpy() & np.isnan(nums)


# --------------------------------------------------------------------------- the preprocessor


@dataclass(frozen=True)
class NumericColumn:
    """A numeric input: nulls become ``fill`` (the training mean), then ``(x - center) / scale``."""

    name: str
    center: float
    scale: float
    fill: float
    stats: dict[str, float | None] = field(default_factory=dict, compare=False)
    """The training split's mean, std, min and max of the column (a record; ``transform`` needs none)."""

    @property
    def feature_names(self) -> list[str]:
        return [self.name]


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical input, one-hot encoded; unseen values and nulls encode as all zeros."""

    name: str
    categories: list[str]

    @property
    def feature_names(self) -> list[str]:
        return [f"{self.name}={c}" for c in self.categories]


Scaling = Literal["standard", "minmax", "none"]


@dataclass
class Preprocessor:
    """Turns raw named columns into the float32 feature matrix the model is trained on."""

    columns: list[NumericColumn | CategoricalColumn]
    scaling: Scaling = "standard"
    nullable: list[str] | None = None
    """The input columns that held nulls in the training split; None: not recorded (files before it was)."""
    _lookup: dict[str, pd.CategoricalDtype] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for c in self.columns:
            if isinstance(c, CategoricalColumn):
                self._lookup[c.name] = pd.CategoricalDtype(categories=c.categories)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        numeric: Mapping[str, Mapping[str, float]],
        categorical: Mapping[str, Iterable[str]],
        order: list[str],
        scaling: Scaling = "standard",
        nullable: Iterable[str] | None = None,
    ) -> Preprocessor:
        """Build from training-split statistics.

        Args:
            numeric: per numeric column ``{"mean", "std", "min", "max"}`` of the training split.
            categorical: per categorical column, the category keys seen in the training split.
            order: the input columns in the order their features appear.
            scaling: ``standard`` (mean 0, std 1), ``minmax`` (to [0, 1]) or ``none``.
            nullable: the columns that hold nulls in the training split (recorded for serving's input checks).
        """
        columns: list[NumericColumn | CategoricalColumn] = []
        for name in order:
            if name in categorical:
                columns.append(CategoricalColumn(name, sort_categories(categorical[name])))
                continue
            s = numeric[name]
            mean = _finite(s.get("mean"), 0.0)
            if scaling == "standard":
                center, scale = mean, _finite(s.get("std"), 1.0)
            elif scaling == "minmax":
                lo, hi = _finite(s.get("min"), 0.0), _finite(s.get("max"), 1.0)
                center, scale = lo, hi - lo
            else:
                center, scale = 0.0, 1.0
            record = {k: _finite(s.get(k), None) for k in _STATS}
            columns.append(NumericColumn(name, float(center), float(scale) if scale > 0 else 1.0, float(mean), record))
        return cls(columns, scaling, list(nullable) if nullable is not None else None)

    # ------------------------------------------------------------------ applying

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, in matrix column order."""
        return [n for c in self.columns for n in c.feature_names]

    @property
    def input_columns(self) -> list[str]:
        """The raw columns ``transform`` reads."""
        return [c.name for c in self.columns]

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode raw named columns into a float32 matrix ``(len(df), len(feature_names))``.

        Raises:
            DataValidationError: a required column is missing, or a numeric column holds non-numbers.
        """
        missing = [c for c in self.input_columns if c not in df.columns]
        if missing:
            raise DataValidationError(
                f"input lacks column {missing[0]!r}"
                + (f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else "")
                + f"; expected columns: {', '.join(self.input_columns)}",
                column=missing[0],
                rows=len(df),
                examples=example_rows(df, np.ones(len(df), dtype=bool)),
            )
        n = len(df)
        out = np.empty((n, len(self.feature_names)), dtype=np.float32)
        j = 0
        for col in self.columns:
            if isinstance(col, NumericColumn):
                x, bad = numeric_values(df[col.name])
                if bad.any():
                    raise DataValidationError(
                        f"column {col.name!r} must be numeric but {int(bad.sum())} row(s) hold non-numeric values",
                        column=col.name,
                        rows=int(bad.sum()),
                        examples=example_rows(df, bad, first=col.name),
                    )
                x = np.where(np.isnan(x), col.fill, x)
                out[:, j] = (x - col.center) / col.scale
                j += 1
            else:
                k = len(col.categories)
                codes = pd.Categorical(category_keys(df[col.name]), dtype=self._lookup[col.name]).codes
                block = np.zeros((n, k), dtype=np.float32)
                hit = codes >= 0
                block[np.flatnonzero(hit), codes[hit]] = 1.0
                out[:, j : j + k] = block
                j += k
        return out

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        cols: list[dict[str, Any]] = []
        for c in self.columns:
            if isinstance(c, NumericColumn):
                cols.append(
                    {"name": c.name, "kind": "numeric", "center": c.center, "scale": c.scale, "fill": c.fill, **c.stats}
                )
            else:
                cols.append({"name": c.name, "kind": "categorical", "categories": list(c.categories)})
        out = {
            "format_version": FORMAT_VERSION,
            "scaling": self.scaling,
            "columns": cols,
            "feature_names": self.feature_names,
        }
        if self.nullable is not None:
            out["nullable"] = list(self.nullable)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessor:
        cols: list[NumericColumn | CategoricalColumn] = []
        for c in d["columns"]:
            if c["kind"] == "numeric":
                stats = {k: c.get(k) for k in _STATS if k in c}
                cols.append(NumericColumn(c["name"], float(c["center"]), float(c["scale"]), float(c["fill"]), stats))
            else:
                cols.append(CategoricalColumn(c["name"], [str(k) for k in c["categories"]]))
        nullable = d.get("nullable")
        return cls(cols, d.get("scaling", "standard"), list(nullable) if nullable is not None else None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def load_preprocessor(path: str | Path) -> Preprocessor:
    """Load a fitted preprocessor saved by ingestion (``preprocessor.json``, or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "preprocessor.json"
    return Preprocessor.from_dict(json.loads(p.read_text()))


def _finite(v: Any, default: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default
