"""The seeded content-hash split: same rows → same split, whatever the order, blocking or dtypes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fabric.data._split import TEST, TRAIN, VAL, row_hash, split_codes


def _frame(n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "k": rng.integers(0, 1_000_000, n),
            "c": rng.choice(["a", "b", "c"], n).astype(object),
            "y": rng.integers(0, 2, n),
        }
    )


COLS = ["x", "k", "c", "y"]


def test_proportions_follow_the_fractions() -> None:
    codes = split_codes(_frame(), COLS, 0.7, 0.15, seed=42)
    frac = np.bincount(codes, minlength=3) / len(codes)
    assert abs(frac[TRAIN] - 0.7) < 0.02 and abs(frac[VAL] - 0.15) < 0.02 and abs(frac[TEST] - 0.15) < 0.02


def test_split_ignores_row_order_blocking_and_index() -> None:
    df = _frame(5000)
    whole = pd.Series(split_codes(df, COLS, 0.7, 0.15, seed=7), index=df.index)
    shuffled = df.sample(frac=1.0, random_state=3)  # keeps the original index labels
    parts = [shuffled.iloc[i : i + 777] for i in range(0, len(shuffled), 777)]
    again = pd.concat([pd.Series(split_codes(p, COLS, 0.7, 0.15, seed=7), index=p.index) for p in parts])
    assert (again.sort_index() == whole).all()


def test_seed_changes_the_split_and_repeats_with_the_same_seed() -> None:
    df = _frame(5000)
    a = split_codes(df, COLS, 0.7, 0.15, seed=1)
    assert (a == split_codes(df, COLS, 0.7, 0.15, seed=1)).all()
    b = split_codes(df, COLS, 0.7, 0.15, seed=2)
    assert (a != b).mean() > 0.3


def test_readers_types_do_not_change_a_rows_hash() -> None:
    as_int = pd.DataFrame({"a": [1, 2, 3], "s": ["x", None, "z"]})
    as_float = pd.DataFrame({"a": [1.0, 2.0, 3.0], "s": pd.array(["x", None, "z"], dtype="string")}, index=[10, 11, 12])
    assert (row_hash(as_int, ["a", "s"]) == row_hash(as_float, ["a", "s"])).all()


def test_identical_rows_share_a_split() -> None:
    df = pd.concat([_frame(300)] * 3, ignore_index=True)
    codes = split_codes(df, COLS, 0.5, 0.25, seed=0).reshape(3, 300)
    assert (codes[0] == codes[1]).all() and (codes[1] == codes[2]).all()
