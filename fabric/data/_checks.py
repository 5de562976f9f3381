"""Schema and expectation checks plus training-split statistics, as mergeable per-batch summaries.

``scan_batch`` looks at one batch of raw rows and returns a small ``BatchScan``; scans merge
associatively, so Ray Data computes them block by block (streaming) and only these summaries reach
the driver. ``evaluate`` turns the merged scan into either a ``Plan`` (column kinds, classes, split
sizes, training statistics) or one DataValidationError listing every violation. Everything here is
plain pandas/numpy and unit-tested without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from fabric.data._preprocess import MAX_EXAMPLES, category_keys, example_rows, numeric_values, sort_categories
from fabric.data._split import SPLITS, TRAIN, assign, row_hash, unit_interval
from fabric.errors import DataValidationError

# A categorical feature or a class label with more distinct values than this is almost surely a
# mistake (an id column, or a regression target); one-hot encoding it would explode the features.
MAX_CATEGORIES = 1000

# Checks in the order a report lists them (schema first, then values, then counts).
_CHECK_ORDER: list[str] = ["missing", "type", "not_null", "range", "allowed", "classes", "min_rows", "split"]


@dataclass(frozen=True)
class ScanSpec:
    """What a scan checks and measures; built once from the DataConfig and the data's columns."""

    features: tuple[str, ...]
    target: str
    task: Literal["classification", "regression"]
    categorical: frozenset[str] = frozenset()
    not_null: tuple[str, ...] = ()
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()
    allowed: tuple[tuple[str, frozenset[str]], ...] = ()
    min_rows: int = 1
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 42
    sample_size: int = 1000
    """Rows of the training split kept as the drift monitor's reference sample."""

    @property
    def columns(self) -> list[str]:
        """Features then the target: what is hashed for the split and summarised for the monitor."""
        return [*self.features, self.target]

    @property
    def required(self) -> list[str]:
        """Every column the config names, in a stable order."""
        seen = dict.fromkeys(
            [*self.columns, *self.not_null, *(c for c, _, _ in self.ranges), *(c for c, _ in self.allowed)]
        )
        return list(seen)


# --------------------------------------------------------------------------- mergeable pieces


@dataclass
class Violation:
    """One failed check on one column: how many rows and the first few of them."""

    check: str
    column: str | None
    rows: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""

    def merge(self, other: Violation) -> Violation:
        return Violation(
            self.check,
            self.column,
            self.rows + other.rows,
            (self.examples + other.examples)[:MAX_EXAMPLES],
            self.detail or other.detail,
        )

    def describe(self) -> str:
        if self.column is None:
            return self.detail
        return f"column {self.column!r}, {self.rows} row(s): {self.detail}"


@dataclass
class ColumnStats:
    """Count, nulls, mean/M2 (Chan et al.'s parallel variance), min, max and capped value counts."""

    rows: int = 0
    nulls: int = 0
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    counts: dict[str, int] | None = None
    overflow: bool = False

    @classmethod
    def of(cls, series: pd.Series, track_counts: bool) -> ColumnStats:
        x, _ = numeric_values(series)
        finite = x[~np.isnan(x)]
        st = cls(rows=len(series), nulls=int(series.isna().sum()), count=len(finite))
        if len(finite):
            st.mean = float(finite.mean())
            st.m2 = float(((finite - st.mean) ** 2).sum())
            st.min, st.max = float(finite.min()), float(finite.max())
        if track_counts:
            counts = pd.Series(category_keys(series), dtype=object).value_counts(dropna=True)
            st.counts = {str(k): int(c) for k, c in counts.items()}
            st._cap()
        return st

    def _cap(self) -> None:
        if self.counts is not None and len(self.counts) > MAX_CATEGORIES:
            self.overflow = True
            top = sorted(self.counts.items(), key=lambda kv: -kv[1])[: MAX_CATEGORIES + 1]
            self.counts = dict(top)

    def merge(self, o: ColumnStats) -> ColumnStats:
        n = self.count + o.count
        out = ColumnStats(rows=self.rows + o.rows, nulls=self.nulls + o.nulls, count=n)
        if n:
            delta = o.mean - self.mean
            out.mean = self.mean + delta * o.count / n
            out.m2 = self.m2 + o.m2 + delta * delta * self.count * o.count / n
            out.min, out.max = min(self.min, o.min), max(self.max, o.max)
        if self.counts is not None or o.counts is not None:
            merged = dict(self.counts or {})
            for k, c in (o.counts or {}).items():
                merged[k] = merged.get(k, 0) + c
            out.counts = merged
            out.overflow = self.overflow or o.overflow
            out._cap()
        return out

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0, as scikit-learn's StandardScaler)."""
        return math.sqrt(self.m2 / self.count) if self.count else float("nan")


@dataclass
class TypeStats:
    """How many values of a column parse as numbers and how many do not (with examples)."""

    numeric: int = 0
    other: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, o: TypeStats) -> TypeStats:
        return TypeStats(self.numeric + o.numeric, self.other + o.other, (self.examples + o.examples)[:MAX_EXAMPLES])


@dataclass
class BatchScan:
    """Everything the driver needs from one batch; scans merge associatively."""

    rows: int = 0
    split_rows: list[int] = field(default_factory=lambda: [0, 0, 0])
    violations: dict[tuple[str, str], Violation] = field(default_factory=dict)
    types: dict[str, TypeStats] = field(default_factory=dict)
    train: dict[str, ColumnStats] = field(default_factory=dict)
    labels: ColumnStats | None = None
    sample_keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The smallest sample keys of training rows (at most ``sample_cap`` of them), sorted."""
    sample_cap: int = 0

    def merge(self, o: BatchScan) -> BatchScan:
        out = BatchScan(self.rows + o.rows, [a + b for a, b in zip(self.split_rows, o.split_rows, strict=True)])
        out.sample_cap = max(self.sample_cap, o.sample_cap)
        out.sample_keys = np.sort(np.concatenate([self.sample_keys, o.sample_keys]))[: out.sample_cap]
        for attr in ("violations", "types", "train"):
            mine, theirs, merged = getattr(self, attr), getattr(o, attr), getattr(out, attr)
            for k in mine.keys() | theirs.keys():
                a, b = mine.get(k), theirs.get(k)
                merged[k] = a.merge(b) if a is not None and b is not None else (a if a is not None else b)
        if self.labels is not None and o.labels is not None:
            out.labels = self.labels.merge(o.labels)
        else:
            out.labels = self.labels or o.labels
        return out


def merge_all(scans: Iterable[BatchScan]) -> BatchScan:
    out = BatchScan()
    for s in scans:
        out = out.merge(s)
    return out


# --------------------------------------------------------------------------- one batch


def _fmt(v: float | None, open_end: str) -> str:
    return open_end if v is None else f"{v:g}"


def scan_batch(df: pd.DataFrame, spec: ScanSpec) -> BatchScan:
    """Check and summarise one batch of raw rows (all splits checked, training rows summarised)."""
    n = len(df)
    scan = BatchScan(rows=n, sample_cap=spec.sample_size)
    if n == 0:
        return scan
    v = scan.violations

    def flag(check: str, column: str, mask: np.ndarray, detail: str) -> None:
        bad = int(mask.sum())
        if bad:
            v[(check, column)] = Violation(check, column, bad, example_rows(df, mask, first=column), detail)

    present = set(df.columns)
    for c in spec.required:
        if c not in present:
            role = "data.target" if c == spec.target else "data.features" if c in spec.features else "data.expectations"
            has = ", ".join(map(str, list(df.columns)[:30]))
            flag("missing", c, np.ones(n, dtype=bool), f"named by {role} but not in the data (its columns: {has})")

    hashes = row_hash(df, spec.columns)
    codes = assign(unit_interval(hashes, spec.seed), spec.train, spec.val)
    scan.split_rows = [int((codes == i).sum()) for i in range(len(SPLITS))]
    keys = unit_interval(hashes[codes == TRAIN], spec.seed, stream=1)
    if len(keys) > spec.sample_size:
        keys = np.partition(keys, spec.sample_size - 1)[: spec.sample_size]
    scan.sample_keys = np.sort(keys)

    for c in dict.fromkeys([*spec.not_null, spec.target]):
        if c in present:
            why = "null target" if c == spec.target else "null (expectations.not_null)"
            flag("not_null", c, df[c].isna().to_numpy(), why)
    for c, lo, hi in spec.ranges:
        if c in present:
            x, other = numeric_values(df[c])
            with np.errstate(invalid="ignore"):
                out = other | (x < (lo if lo is not None else -np.inf)) | (x > (hi if hi is not None else np.inf))
            flag("range", c, out, f"outside [{_fmt(lo, '-inf')}, {_fmt(hi, 'inf')}] (expectations.ranges)")
    for c, allowed in spec.allowed:
        if c in present:
            k = category_keys(df[c])
            out = pd.notna(k) & ~pd.Series(k, dtype=object).isin(allowed).to_numpy()
            flag("allowed", c, out, f"not in expectations.allowed {sorted(allowed)}")

    # Type of every column that is not declared categorical: numbers, or non-numbers, or a mix (an error).
    numeric_expected = [c for c in spec.features if c not in spec.categorical]
    if spec.task == "regression":
        numeric_expected.append(spec.target)
    for c in numeric_expected:
        if c in present:
            x, other = numeric_values(df[c])
            scan.types[c] = TypeStats(
                int((~np.isnan(x)).sum()), int(other.sum()), example_rows(df, other, first=c) if other.any() else []
            )

    train = codes == TRAIN
    sub = df.loc[train]
    for c in spec.columns:
        if c in present:
            s = sub[c]
            track = (
                c in spec.categorical
                or (c == spec.target and spec.task == "classification")
                or not (pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype))
            )
            scan.train[c] = ColumnStats.of(s, track)
    if spec.task == "classification" and spec.target in present:
        scan.labels = ColumnStats.of(df[spec.target], track_counts=True)
    return scan


# --------------------------------------------------------------------------- the verdict


@dataclass
class Plan:
    """What a clean scan tells the writer: column kinds, classes, split sizes, training statistics."""

    kinds: dict[str, Literal["numeric", "categorical"]]
    inferred_categorical: list[str]
    classes: list[str] | None
    rows: dict[str, int]
    train: dict[str, ColumnStats]
    sample_threshold: float = 1.0
    """Training rows whose sample key is <= this form the reference sample (inf: every training row)."""

    def numeric_stats(self) -> dict[str, dict[str, float]]:
        return {
            c: {"mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
            for c, s in self.train.items()
            if self.kinds.get(c) == "numeric"
        }

    def nullable(self, columns: list[str]) -> list[str]:
        """The ``columns`` that hold nulls in the training split (serving refuses nulls in the others)."""
        return [c for c in columns if c in self.train and self.train[c].nulls > 0]

    def categories(self) -> dict[str, list[str]]:
        return {c: list((self.train[c].counts or {}).keys()) for c, k in self.kinds.items() if k == "categorical"}


def evaluate(scan: BatchScan, spec: ScanSpec) -> Plan:
    """Decide column kinds and classes from a merged scan, or raise one error listing every violation."""
    violations = dict(scan.violations)

    def add(check: str, column: str | None, rows: int, detail: str, examples: list[dict] | None = None) -> None:
        violations[(check, column or "")] = Violation(check, column, rows, examples or [], detail)

    kinds: dict[str, Literal["numeric", "categorical"]] = {}
    inferred: list[str] = []
    for c in spec.features:
        if c in spec.categorical:
            kinds[c] = "categorical"
            continue
        t = scan.types.get(c, TypeStats())
        if t.other == 0:
            kinds[c] = "numeric"
        elif t.numeric == 0:
            kinds[c] = "categorical"  # text values only: a categorical column nobody declared
            inferred.append(c)
        else:
            add(
                "type",
                c,
                t.other,
                f"numeric column holds non-numeric value(s) (among {t.numeric} numbers); fix them, "
                f"or list {c!r} in data.categorical if it is categorical",
                t.examples,
            )
    if spec.task == "regression":
        t = scan.types.get(spec.target, TypeStats())
        if t.other:
            add("type", spec.target, t.other, "regression target holds non-numeric value(s)", t.examples)

    for c, kind in kinds.items():
        st = scan.train.get(c)
        if kind == "categorical" and st is not None and st.overflow:
            add(
                "type",
                c,
                st.count,
                f"categorical column has more than {MAX_CATEGORIES} distinct values in the training split; "
                "is it an id? leave it out of data.features",
            )

    classes: list[str] | None = None
    if spec.task == "classification" and scan.labels is not None:
        counts = scan.labels.counts or {}
        if scan.labels.overflow:
            add(
                "classes",
                spec.target,
                scan.rows,
                f"classification target has more than {MAX_CATEGORIES} distinct values; set data.task=regression?",
            )
        elif 0 < len(counts) < 2:
            add("classes", spec.target, scan.rows, f"classification target has a single class {list(counts)}")
        classes = sort_categories(counts)

    if scan.rows < spec.min_rows:
        add(
            "min_rows",
            None,
            scan.rows,
            f"the data has {scan.rows} row(s), fewer than expectations.min_rows={spec.min_rows}",
        )
    rows = dict(zip(SPLITS, scan.split_rows, strict=True))
    if scan.rows and not any(v.check in ("missing",) for v in violations.values()):
        for name, frac in (("train", spec.train), ("val", spec.val), ("test", spec.test)):
            if frac > 0 and rows[name] == 0:
                add(
                    "split",
                    None,
                    scan.rows,
                    f"the {name} split got no rows out of {scan.rows}: too few rows for the configured split fractions",
                )

    if violations:
        raise validation_error(list(violations.values()))
    keys = scan.sample_keys
    threshold = float(keys[spec.sample_size - 1]) if len(keys) >= spec.sample_size else math.inf
    return Plan(kinds, inferred, classes, rows, dict(scan.train), threshold)


def validation_error(violations: list[Violation]) -> DataValidationError:
    """One DataValidationError naming every violation; its fields describe the first."""
    ordered = sorted(violations, key=lambda v: (_CHECK_ORDER.index(v.check), v.column or ""))
    first = ordered[0]
    if len(ordered) == 1:
        head = f"data check failed [{first.check}] {first.describe()}"
    else:
        lines = "\n".join(f"  - [{v.check}] {v.describe()}" for v in ordered)
        head = f"data failed {len(ordered)} checks:\n{lines}"
    err = DataValidationError(head, column=first.column, rows=first.rows, examples=first.examples)
    err.violations = [  # type: ignore[attr-defined]
        {"check": v.check, "column": v.column, "rows": v.rows, "detail": v.detail, "examples": v.examples}
        for v in ordered
    ]
    return err
