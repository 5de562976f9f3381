"""One input column of a batch as the input checks and the saved preprocessing read it: from pandas (the bad-row
report re-reads files as pandas) or from pyarrow (the scoring tasks' batches, with no pandas round trip).

Both give the same answers row for row: the pyarrow view handles the column types whose reading it can match
exactly (numbers and booleans as numbers; text and integers as category keys) with pyarrow compute kernels, and
reads any other type through pandas, column by column.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fabric.data._preprocess import CategoricalColumn, Preprocessor, category_keys, numeric_values

if TYPE_CHECKING:
    import pyarrow as pa


class PandasColumn:
    """A pandas Series: nulls, numbers and category keys as ``Preprocessor.transform`` reads them."""

    def __init__(self, series: pd.Series) -> None:
        self.series = series

    def isna(self) -> np.ndarray:
        """Rows that hold no value (None, NaN, NA, NaT)."""
        return np.asarray(self.series.isna().to_numpy(), dtype=bool)

    @cached_property
    def numbers(self) -> tuple[np.ndarray, np.ndarray]:
        """Float64 values (NaN for nulls and non-numbers) and the rows that hold a value that is not a number."""
        return numeric_values(self.series)

    def codes(self, keys: Sequence[str]) -> np.ndarray:
        """Each row's position in ``keys`` (category keys: 3, 3.0 and "3" are "3"); -1 for nulls and others."""
        return np.asarray(pd.Index(list(keys), dtype=object).get_indexer(category_keys(self.series)), dtype=np.int64)

    def float32(self) -> np.ndarray:
        """The raw values as float32 (a model without a preprocessor reads its features so)."""
        return self.series.to_numpy(np.float32)


class ArrowColumn:
    """A pyarrow column; types pyarrow cannot read exactly as pandas does go through :class:`PandasColumn`."""

    def __init__(self, column: pa.ChunkedArray | pa.Array) -> None:
        import pyarrow as pa
        import pyarrow.types as pat

        self.column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        t = self.column.type
        self._number = pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_null(t)
        self._text = pat.is_string(t) or pat.is_large_string(t)
        self._key = self._text or pat.is_integer(t) or pat.is_null(t)  # str(int) is the key of an integer

    @cached_property
    def _pandas(self) -> PandasColumn:
        return PandasColumn(self.column.to_pandas())

    def isna(self) -> np.ndarray:
        import pyarrow.compute as pc
        import pyarrow.types as pat

        floating = pat.is_floating(self.column.type)
        if not floating and self.column.null_count == 0:
            return np.zeros(len(self.column), dtype=bool)
        if self._number or self._text:
            return np.asarray(pc.is_null(self.column, nan_is_null=floating).to_numpy(zero_copy_only=False))
        return self._pandas.isna()

    @cached_property
    def numbers(self) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self._number:
            return self._pandas.numbers
        x = self.column
        if x.type != pa.float64():
            x = pc.cast(x, pa.float64(), safe=False)
        if x.null_count:
            x = pc.fill_null(x, np.nan)
        return np.asarray(x.to_numpy(zero_copy_only=False)), np.zeros(len(x), dtype=bool)

    def codes(self, keys: Sequence[str]) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self._key:
            return self._pandas.codes(keys)
        x = self.column if self._text else pc.cast(self.column, pa.string())
        found = pc.index_in(x, value_set=pa.array(list(keys), type=x.type))
        return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)

    def float32(self) -> np.ndarray:
        if not self._number:
            return self._pandas.float32()
        return self.numbers[0].astype(np.float32)


Column = PandasColumn | ArrowColumn


def features(pre: Preprocessor, columns: dict[str, Column], n: int) -> np.ndarray:
    """``pre.transform`` of the batch whose columns are ``columns``: the float32 feature matrix.

    The rows have passed the input checks, so numeric columns hold numbers or nulls (nulls take the fill).
    """
    out = np.empty((n, len(pre.feature_names)), dtype=np.float32)
    j = 0
    for spec in pre.columns:
        col = columns[spec.name]
        if isinstance(spec, CategoricalColumn):
            k = len(spec.categories)
            codes = col.codes(spec.categories)
            block = np.zeros((n, k), dtype=np.float32)
            hit = codes >= 0
            block[np.flatnonzero(hit), codes[hit]] = 1.0
            out[:, j : j + k] = block
            j += k
        else:
            x = col.numbers[0]
            x = np.where(np.isnan(x), spec.fill, x)
            out[:, j] = (x - spec.center) / spec.scale
            j += 1
    return out
