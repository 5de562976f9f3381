"""Deterministic, seeded row assignment to train/val/test, computed from each row's content.

A row's split depends only on its values and the seed, never on where it sits in a file or which
Ray block carries it, so the split is the same on every run, on any cluster size, in any read
order, and changes when the seed does. Identical rows always land in the same split, so duplicated
examples cannot leak from training into evaluation. Proportions are met in expectation (a hash is
a coin toss per row), which is how large-scale pipelines split data without a global shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast bijective scramble of uint64 values."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _MASK64


def _normalised(series: pd.Series) -> pd.Series:
    """One representation per value, whatever dtype a reader gave the column in this block.

    Numbers hash as float64 (so 3 read as int and 3.0 read as float are the same row), everything
    else as its string form; nulls hash alike.
    """
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        return pd.to_numeric(series, errors="coerce").astype("float64")
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    mapped = np.empty(len(uniques) + 1, dtype=object)
    mapped[:-1] = [str(v) for v in uniques]
    mapped[-1] = None
    return pd.Series(mapped[codes], dtype=object)


def row_hash(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """A stable uint64 per row from the values of ``columns`` (missing columns hash as nulls)."""
    if len(df) == 0:
        return np.zeros(0, dtype=np.uint64)
    # Plain arrays, not Series: a block's index (e.g. rows 1592.. of a slice) must not align anything.
    frame = pd.DataFrame(
        {
            c: (_normalised(df[c]).to_numpy() if c in df.columns else np.full(len(df), None, dtype=object))
            for c in columns
        }
    )
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def unit_interval(hashes: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Map row hashes to floats in [0, 1), one independent stream per (seed, stream)."""
    key = _mix(np.array([(seed * 2 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    mixed = _mix(hashes ^ key)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def assign(u: np.ndarray, train: float, val: float) -> np.ndarray:
    """Split codes (TRAIN, VAL, TEST) from uniform draws ``u`` and the train/val fractions."""
    codes = np.full(u.shape, TEST, dtype=np.int8)
    codes[u < train + val] = VAL
    codes[u < train] = TRAIN
    return codes


def split_codes(df: pd.DataFrame, columns: Sequence[str], train: float, val: float, seed: int) -> np.ndarray:
    """The split code of every row of ``df``: a pure function of its ``columns`` values and ``seed``."""
    return assign(unit_interval(row_hash(df, columns), seed), train, val)
