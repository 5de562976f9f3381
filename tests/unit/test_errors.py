"""The error tree: structured fields, pickling across Ray, and extras named in ImportErrors."""

from __future__ import annotations

import pickle

import pytest

from fabric.errors import DataValidationError, MissingExtraError, require


def test_missing_extra_is_an_import_error_naming_the_extra() -> None:
    with pytest.raises(ImportError) as info:
        require("fabric_no_such_module", "track")
    assert isinstance(info.value, MissingExtraError)
    assert "pip install 'fabric[track]'" in str(info.value)


def test_data_validation_error_keeps_fields_through_pickle() -> None:
    err = DataValidationError("3 rows of 'age' are null", column="age", rows=3, examples=[{"age": None, "x": 1}])
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.column, copy.rows, copy.examples) == ("age", 3, [{"age": None, "x": 1}])
    assert "'age': None" in str(copy)
