"""Config of batch scoring (``fabric predict``): Ray Data streams rows through a registered model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fabric.config._base import Section

RESERVED_COLUMNS = ("prediction", "label", "model_name", "model_version")
"""Output columns of scoring (``proba_<k>`` too): a kept input column must not take their names."""


class PredictConfig(Section):
    """How ``fabric predict`` scores a file or URI with a registered model version."""

    input: str | None = None
    """Rows to score: a parquet, CSV or JSON-lines file, a folder of them, a URI (s3://, gs://) or
    ``builtin:<name>`` (``fabric predict --input``)."""
    output: str | None = None
    """Where predictions go: a folder of parquet (or CSV) files, moved into place only when complete
    (``fabric predict --output``)."""
    version: int | None = Field(default=None, ge=1)
    """Registry version of ``track.model_name`` to score with; None: ``alias``."""
    alias: str | None = None
    """Registry alias to score with; None (and no ``version``): ``champion``."""
    batch_size: int = Field(default=16384, ge=1)
    """Rows per batch handed to the model (each call also checks and preprocesses them: large batches amortise
    the per-call cost)."""
    concurrency: int | None = Field(default=None, ge=1)
    """Scoring tasks at a time (each Ray worker keeps one ONNX Runtime session); None: one per CPU the cluster has."""
    keep_columns: list[str] = Field(default_factory=list)
    """Columns copied from the input to the output unchanged (ids, pass-through fields)."""
    output_format: Literal["auto", "parquet", "csv"] = "auto"
    """``auto``: from the output path's extension (parquet unless it ends in ``.csv``)."""
    overwrite: bool = False
    """Replace an existing output (only once the new one is complete); False: an existing output is an error."""
    impute_nulls: bool = False
    """Fill nulls as training did even in columns that held none in training; False: such a row is a bad row."""
    max_reported: int = Field(default=10, ge=1)
    """Bad rows listed in the error when the input fails its checks."""

    @model_validator(mode="after")
    def _one_selector(self) -> PredictConfig:
        if self.version is not None and self.alias is not None:
            raise ValueError("set version or alias, not both")
        clash = sorted({c for c in self.keep_columns if c in RESERVED_COLUMNS or c.startswith("proba_")})
        if clash:
            names = ", ".join(RESERVED_COLUMNS)
            raise ValueError(f"keep_columns {clash} would clash with the output columns ({names}, proba_<k>)")
        return self
