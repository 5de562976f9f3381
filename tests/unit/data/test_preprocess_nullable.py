"""What serving's strict input checks read from the fitted preprocessor: the columns that held nulls in training."""

from __future__ import annotations

import pandas as pd

from fabric.data import Preprocessor
from fabric.data._checks import ColumnStats, Plan


def test_the_plan_lists_the_columns_with_nulls_in_the_training_split() -> None:
    stats = {
        "a": ColumnStats.of(pd.Series([1.0, 2.0, 3.0]), track_counts=False),
        "b": ColumnStats.of(pd.Series([1.0, None, 3.0]), track_counts=False),
        "c": ColumnStats.of(pd.Series(["x", None, "y"]), track_counts=True),
    }
    plan = Plan({"a": "numeric", "b": "numeric", "c": "categorical"}, [], None, {}, stats)
    assert plan.nullable(["a", "b", "c", "missing"]) == ["b", "c"]


def test_nullable_columns_survive_preprocessor_json() -> None:
    numeric = {"a": {"mean": 1.0, "std": 1.0, "min": 0.0, "max": 2.0}, "b": {"mean": 0.0, "std": 1.0}}
    pre = Preprocessor.fit(numeric, {"c": ["x", "y"]}, ["a", "b", "c"], nullable=["b", "c"])
    back = Preprocessor.from_dict(pre.to_dict())
    assert back.nullable == ["b", "c"] and back == pre
    # a preprocessor.json written before nulls were recorded: unknown, not "none"
    old = {k: v for k, v in pre.to_dict().items() if k != "nullable"}
    assert Preprocessor.from_dict(old).nullable is None
