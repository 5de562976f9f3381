"""Schema/expectation checks and training statistics, computed per batch and merged (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fabric.data._checks import ScanSpec, evaluate, merge_all, scan_batch
from fabric.data._split import TRAIN, split_codes
from fabric.errors import DataValidationError


def _data(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(40, 10, n).round(1),
            "city": rng.choice(["paris", "oslo", "rome"], n).astype(object),
            "y": rng.integers(0, 3, n),
        }
    )


SPEC = ScanSpec(features=("age", "city"), target="y", task="classification", sample_size=50)


def _scan(df: pd.DataFrame, spec: ScanSpec = SPEC, blocks: int = 7):
    step = -(-len(df) // blocks)
    return merge_all(scan_batch(df.iloc[i : i + step], spec) for i in range(0, len(df), step))


def test_merged_block_statistics_equal_the_whole_training_split() -> None:
    df = _data()
    plan = evaluate(_scan(df), SPEC)
    train = df[split_codes(df, SPEC.columns, SPEC.train, SPEC.val, SPEC.seed) == TRAIN]
    st = plan.train["age"]
    assert st.count == len(train) == plan.rows["train"]
    assert st.mean == pytest.approx(train["age"].mean(), rel=1e-12)
    assert st.std == pytest.approx(train["age"].std(ddof=0), rel=1e-9)
    assert (st.min, st.max) == (train["age"].min(), train["age"].max())
    assert plan.train["city"].counts == train["city"].value_counts().to_dict()
    assert plan.kinds == {"age": "numeric", "city": "categorical"}  # text only: inferred categorical
    assert plan.inferred_categorical == ["city"]
    assert plan.classes == ["0", "1", "2"]
    assert sum(plan.rows.values()) == len(df)


def test_reference_sample_threshold_is_the_global_bottom_k() -> None:
    from fabric.data._split import row_hash, unit_interval

    df = _data()
    plan = evaluate(_scan(df), SPEC)
    h = row_hash(df, SPEC.columns)
    train = split_codes(df, SPEC.columns, SPEC.train, SPEC.val, SPEC.seed) == TRAIN
    keys = np.sort(unit_interval(h[train], SPEC.seed, stream=1))
    assert plan.sample_threshold == keys[SPEC.sample_size - 1]


def _violation(df: pd.DataFrame, spec: ScanSpec) -> DataValidationError:
    with pytest.raises(DataValidationError) as e:
        evaluate(_scan(df, spec), spec)
    return e.value


def test_not_null_counts_rows_and_shows_them() -> None:
    df = _data()
    df.loc[[5, 17, 2500], "age"] = np.nan
    err = _violation(df, ScanSpec(("age", "city"), "y", "classification", not_null=("age",)))
    assert (err.column, err.rows) == ("age", 3)
    assert len(err.examples) == 3 and all(r["age"] is None for r in err.examples)
    assert "age" in str(err) and "3 row(s)" in str(err)


def test_range_and_allowed_are_all_reported() -> None:
    df = _data()
    df.loc[[1, 2], "age"] = -5.0
    df.loc[[3], "city"] = "atlantis"
    spec = ScanSpec(
        ("age", "city"),
        "y",
        "classification",
        ranges=(("age", 0.0, 120.0),),
        allowed=(("city", frozenset({"paris", "oslo", "rome"})),),
    )
    err = _violation(df, spec)
    found = {(v["check"], v["column"], v["rows"]) for v in err.violations}
    assert found == {("range", "age", 2), ("allowed", "city", 1)}
    assert err.column == "age" and {r["age"] for r in err.examples} == {-5.0}
    assert "atlantis" in str(err.violations[1]["examples"])


def test_text_in_a_numeric_column_is_a_type_error() -> None:
    df = _data().astype({"age": object})
    df.loc[[10, 11], "age"] = "unknown"
    err = _violation(df, SPEC)
    assert (err.column, err.rows) == ("age", 2)
    assert "data.categorical" in str(err) and err.examples[0]["age"] == "unknown"


def test_declared_categorical_accepts_mixed_values() -> None:
    df = _data().astype({"age": object})
    df.loc[[10, 11], "age"] = "unknown"
    spec = ScanSpec(("age", "city"), "y", "classification", categorical=frozenset({"age"}))
    assert evaluate(_scan(df, spec), spec).kinds["age"] == "categorical"


def test_missing_column_in_some_blocks_counts_those_rows() -> None:
    df = _data(1000)
    a, b = df.iloc[:400], df.iloc[400:].drop(columns=["city"])
    with pytest.raises(DataValidationError) as e:
        evaluate(scan_batch(a, SPEC).merge(scan_batch(b, SPEC)), SPEC)
    assert (e.value.column, e.value.rows) == ("city", 600)


def test_row_count_floor() -> None:
    err = _violation(_data(300), ScanSpec(("age", "city"), "y", "classification", min_rows=1000))
    assert err.rows == 300 and "min_rows=1000" in str(err)


def test_null_target_and_single_class_are_refused() -> None:
    df = _data(500)
    df["y"] = 1.0
    df.loc[7, "y"] = np.nan
    err = _violation(df, SPEC)
    checks = {v["check"] for v in err.violations}
    assert checks == {"not_null", "classes"}
    assert err.column == "y" and err.rows == 1


def test_regression_target_must_be_numeric() -> None:
    df = _data(500).astype({"y": object})
    df.loc[3, "y"] = "n.a."
    spec = ScanSpec(("age", "city"), "y", "regression")
    err = _violation(df, spec)
    assert (err.column, err.rows) == ("y", 1)


def test_id_like_categorical_is_refused() -> None:
    n = 3000
    df = pd.DataFrame({"user": [f"u{i}" for i in range(n)], "y": np.arange(n) % 2})
    err = _violation(df, ScanSpec(("user",), "y", "classification"))
    assert err.column == "user" and "distinct" in str(err)
