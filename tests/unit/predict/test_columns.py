"""The scoring actors read batches as pyarrow columns: nulls, numbers, category keys, the input checks and the
saved preprocessing must agree row for row with the pandas reading (``Preprocessor.transform``, ``check_frame``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fabric.config.data import Expectations
from fabric.config.predict import PredictConfig
from fabric.data import Preprocessor
from fabric.predict._columns import ArrowColumn, PandasColumn, features
from fabric.predict._tabular import check_columns, check_frame, input_rules
from tests.unit.serve.models import PREPROCESSOR

COLUMNS = {
    "float": pa.array([1.5, None, float("nan"), -2.0, 0.0], pa.float64()),
    "float32": pa.array([1.5, None, 3.0, float("nan"), 2.0], pa.float32()),
    "int": pa.array([3, None, -7, 0, 2**40], pa.int64()),
    "int_full": pa.array([3, 4, 5, 6, 7], pa.int32()),
    "bool": pa.array([True, None, False, True, False]),
    "text": pa.array(["oslo", None, "3", "paris", ""]),
    "large_text": pa.array(["a", "b", None, "oslo", "3.0"], pa.large_string()),
    "dict": pa.array(["oslo", "paris", None, "oslo", "rome"]).dictionary_encode(),
    "nulls": pa.nulls(5),
    "decimal": pa.array([None, 1, 2, 3, 4], pa.int8()).cast(pa.decimal128(5, 2)),
    "date": pa.array([0, None, 2, 3, 4], pa.int32()).cast(pa.date32()),
}
KEYS = ["oslo", "paris", "3", "-7", "4", "1099511627776", "True", "3.0"]


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_arrow_column_reads_like_pandas(name: str) -> None:
    arrow, series = COLUMNS[name], pa.table({"c": COLUMNS[name]}).to_pandas()["c"]
    a, p = ArrowColumn(pa.chunked_array([arrow[:2], arrow[2:]])), PandasColumn(series)
    np.testing.assert_array_equal(a.isna(), p.isna())
    np.testing.assert_array_equal(a.numbers[0], p.numbers[0])  # NaN where either reads no number
    np.testing.assert_array_equal(a.numbers[1], p.numbers[1])
    np.testing.assert_array_equal(a.codes(KEYS), p.codes(KEYS))
    if not p.numbers[1].any():
        np.testing.assert_array_equal(a.float32(), np.asarray(p.numbers[0], dtype=np.float32))


def test_checks_and_features_agree_with_pandas() -> None:
    table = pa.table(
        {
            "id": pa.array([10, 11, 12, 13, 14, 15]),
            "age": pa.array(["30", None, "old", "150", "40", "41"]),  # text in a numeric column: read via pandas
            "income": pa.array([1.0, None, 2.0, float("nan"), 4.0, 5.0]),
            "city": pa.array(["oslo", "paris", "oslo", "oslo", None, "rome"]),
        }
    )
    expectations = Expectations.model_validate(
        {"not_null": ["city"], "ranges": {"age": {"min": 0, "max": 120}, "income": {"max": 4.5}},
         "allowed": {"city": ["oslo", "paris"]}}
    )  # fmt: skip
    pre = Preprocessor.from_dict(PREPROCESSOR)
    rules = input_rules(pre, [], PredictConfig.model_validate({"keep_columns": ["id"]}), expectations)
    arrow = {c: ArrowColumn(table.column(c)) for c in table.column_names}
    df = table.to_pandas()
    found = [(f.column, f.why, f.mask.tolist()) for f in check_columns(arrow, table.num_rows, rules)]
    assert found == [(f.column, f.why, f.mask.tolist()) for f in check_frame(df, rules)]
    assert {c for c, _, _ in found} == {"age", "city", "income"}

    for good in (
        pa.table({"age": ["30", "41"], "income": [1.0, None], "city": ["oslo", None]}),
        pa.table(
            {"age": pa.array([30, None, 2], pa.int16()), "income": [1.0, None, 3.5], "city": ["paris", "x", None]}
        ),
    ):
        cols = {c: ArrowColumn(good.column(c)) for c in good.column_names}
        np.testing.assert_array_equal(features(pre, cols, good.num_rows), pre.transform(good.to_pandas()))
    numeric = pa.table({"age": [1.0], "income": [2.0], "city": ["oslo"]})
    empty = {c: ArrowColumn(numeric.slice(0, 0).column(c)) for c in numeric.column_names}
    assert features(pre, empty, 0).shape == (0, len(pre.feature_names))
