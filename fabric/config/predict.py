"""Config of batch scoring (``fabric predict``): Ray Data streams rows through a registered model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fabric.config._base import Section


class PredictConfig(Section):
    """How ``fabric predict`` scores a file or URI with a registered model version."""

    batch_size: int = Field(default=4096, ge=1)
    """Rows per batch handed to the model."""
    concurrency: int | None = Field(default=None, ge=1)
    """Scoring actors (each holds one ONNX Runtime session); None: one per CPU the cluster has."""
    keep_columns: list[str] = Field(default_factory=list)
    """Columns copied from the input to the output unchanged (ids, pass-through fields)."""
    output_format: Literal["auto", "parquet", "csv"] = "auto"
    """``auto``: from the output path's extension (parquet unless it ends in ``.csv``)."""
