"""Config of the ingestion stage (Ray Data)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section, is_uri

BUILTIN_PREFIX = "builtin:"
# Datasets that `builtin:<name>` names (fabric.data._builtin loads them; a test keeps the two in step).
BUILTIN_DATASETS = ("fair", "breast_cancer", "wine", "diabetes")


class Range(Section):
    """Inclusive bounds for a numeric column; either side may be open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class Expectations(Section):
    """Checks every row must pass before anything downstream runs."""

    not_null: list[str] = Field(default_factory=list)
    """Columns that may hold no null/NaN."""
    ranges: dict[str, Range] = Field(default_factory=dict)
    """Per-column inclusive numeric bounds."""
    allowed: dict[str, list[str | int | float | bool]] = Field(default_factory=dict)
    """Per-column set of allowed values (categorical columns)."""
    min_rows: int = Field(default=1, ge=0)
    """Fail if the dataset has fewer rows than this."""


class Split(Section):
    """Deterministic train/validation/test split fractions."""

    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DataConfig(Section):
    """Where the data is, what it must look like and how it is prepared."""

    source: str = "builtin:fair"
    """A local file or folder, a pyarrow URI (s3://, gs://, file://) or ``builtin:<name>``: ``fair``
    (Fair's affairs survey from statsmodels, 6,366 rows, the default), ``breast_cancer`` (binary), ``wine``
    (3 classes) or ``diabetes`` (regression; set ``task: regression``), the last three from scikit-learn."""
    format: Literal["auto", "parquet", "csv", "json", "text"] = "auto"
    """File format; ``auto`` picks it from the file extension."""
    target: str = "target"
    """Label column."""
    task: Literal["classification", "regression"] = "classification"
    features: list[str] | None = None
    """Feature columns; None means every column but the target."""
    categorical: list[str] = Field(default_factory=list)
    """Columns one-hot encoded (fitted on the training split only). Feature columns holding only text are
    treated as categorical even when not listed; a numeric column with stray text values is an error."""
    scaling: Literal["standard", "minmax", "none"] = "standard"
    expectations: Expectations = Field(default_factory=Expectations)
    split: Split = Field(default_factory=Split)
    reference_sample_size: int = Field(default=1000, ge=1)
    """Rows of the training split kept as the drift monitor's reference sample."""

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX):
            name = v[len(BUILTIN_PREFIX) :]
            if name not in BUILTIN_DATASETS:
                raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
            return v
        if is_uri(v):
            return v
        if not Path(v).exists():
            raise ValueError(f"file not found: {v!r} (a local path, a URI such as s3://..., or builtin:<name>)")
        return v

    @model_validator(mode="after")
    def _target_is_not_a_feature(self) -> DataConfig:
        if self.features is not None and self.target in self.features:
            raise ValueError(f"target {self.target!r} must not be listed in features")
        if self.target in self.categorical:
            raise ValueError(f"target {self.target!r} must not be listed in categorical (classes are encoded anyway)")
        if self.features is not None:
            stray = [c for c in self.categorical if c not in self.features]
            if stray:
                raise ValueError(f"categorical column(s) {stray} are not in features")
        return self
