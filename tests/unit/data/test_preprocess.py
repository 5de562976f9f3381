"""The preprocessor: fitted from training statistics, applied to raw named columns (what serving sends)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from fabric.data import Preprocessor, load_preprocessor
from fabric.data._preprocess import category_keys
from fabric.errors import DataValidationError


def _stats(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {c: {"mean": df[c].mean(), "std": df[c].std(ddof=0), "min": df[c].min(), "max": df[c].max()} for c in df}


@pytest.fixture
def train() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"age": rng.normal(40, 10, 500), "income": rng.lognormal(10, 1, 500)})


def test_standard_scaling_matches_scikit_learn(train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train), {}, ["age", "income"], "standard")
    other = train * 1.5 + 3
    np.testing.assert_allclose(pre.transform(other), StandardScaler().fit(train).transform(other), rtol=1e-5)


def test_minmax_scaling_matches_scikit_learn(train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train), {}, ["age", "income"], "minmax")
    np.testing.assert_allclose(pre.transform(train), MinMaxScaler().fit_transform(train), rtol=1e-5, atol=1e-6)


def test_one_hot_uses_training_categories_and_zeros_for_unseen() -> None:
    pre = Preprocessor.fit({"x": {"mean": 0, "std": 1}}, {"colour": ["red", "blue"]}, ["colour", "x"])
    assert pre.feature_names == ["colour=blue", "colour=red", "x"]
    out = pre.transform(pd.DataFrame({"x": [1.0, 2.0, 3.0], "colour": ["red", "green", None]}))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :2], [[0, 1], [0, 0], [0, 0]])


def test_numeric_codes_match_across_representations() -> None:
    # A CSV gives ints, a JSON request may give floats or strings: all the same category.
    assert list(category_keys(pd.Series([3, 4]))) == ["3", "4"]
    assert list(category_keys(pd.Series([3.0, None]))) == ["3", None]
    assert list(category_keys(pd.Series(["3", None], dtype=object))) == ["3", None]
    pre = Preprocessor.fit({}, {"occ": ["1", "2", "10"]}, ["occ"])
    assert pre.feature_names == ["occ=1", "occ=2", "occ=10"]  # numeric order, not lexical
    a = pre.transform(pd.DataFrame({"occ": [2, 10]}))
    b = pre.transform(pd.DataFrame({"occ": ["2", 10.0]}))
    np.testing.assert_array_equal(a, b)


def test_missing_numbers_take_the_training_mean(train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train), {}, ["age", "income"])
    out = pre.transform(pd.DataFrame({"age": [None, 50.0], "income": [np.nan, 1.0]}))
    assert out[0, 0] == 0.0 and out[0, 1] == 0.0  # the mean, standardised


def test_missing_column_names_it(train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train), {}, ["age", "income"])
    with pytest.raises(DataValidationError, match="income") as e:
        pre.transform(pd.DataFrame({"age": [1.0, 2.0]}))
    assert e.value.column == "income" and e.value.rows == 2


def test_text_in_a_numeric_column_is_refused_with_the_rows(train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train), {}, ["age", "income"])
    df = pd.DataFrame({"age": ["41", "old", 30], "income": [1.0, 2.0, 3.0]})
    with pytest.raises(DataValidationError) as e:
        pre.transform(df)
    assert e.value.column == "age" and e.value.rows == 1
    assert e.value.examples[0]["age"] == "old"


def test_constant_column_does_not_divide_by_zero() -> None:
    pre = Preprocessor.fit({"c": {"mean": 5.0, "std": 0.0, "min": 5.0, "max": 5.0}}, {}, ["c"], "minmax")
    assert np.isfinite(pre.transform(pd.DataFrame({"c": [5.0, 6.0]}))).all()


def test_save_and_load_round_trip(tmp_path, train: pd.DataFrame) -> None:
    pre = Preprocessor.fit(_stats(train[["age"]]), {"c": ["a", "b"]}, ["age", "c"], "standard")
    pre.save(tmp_path / "preprocessor.json")
    df = pd.DataFrame({"age": [10.0, 50.0], "c": ["b", "a"], "extra": [1, 2]})
    for where in (tmp_path / "preprocessor.json", tmp_path):
        loaded = load_preprocessor(where)
        assert loaded.feature_names == pre.feature_names
        np.testing.assert_array_equal(loaded.transform(df), pre.transform(df))
