"""Tracking and the model registry: the MetricLogger seam (MLflow, W&B), rank-0 guards, promotion.

Importing this package loads neither mlflow nor wandb nor torch; each adapter imports its library when
it is created and names the extra that installs it when missing.
"""

from fabric.tracking._lm import AdapterRegistration, log_finetune
from fabric.tracking._loggers import (
    MetricLogger,
    MLflowLogger,
    MultiLogger,
    NullLogger,
    WandbLogger,
    artifact_location,
    make_logger,
    tracking_uri,
)
from fabric.tracking._predict import data_dir, headline, per_row_loss, predictions_frame, read_split, score
from fabric.tracking._promotion import Comparison, Decision, compare, decide
from fabric.tracking._rank import is_rank_zero, on_rank_zero, world_rank
from fabric.tracking._registry import (
    CANDIDATE,
    CHAMPION,
    Promotion,
    RegistryResult,
    alias_version,
    load_registered,
    promote,
    resolve_model,
    run,
)

__all__ = [
    "AdapterRegistration",
    "CANDIDATE",
    "CHAMPION",
    "Comparison",
    "Decision",
    "MLflowLogger",
    "MetricLogger",
    "MultiLogger",
    "NullLogger",
    "Promotion",
    "RegistryResult",
    "WandbLogger",
    "alias_version",
    "artifact_location",
    "compare",
    "data_dir",
    "decide",
    "headline",
    "is_rank_zero",
    "log_finetune",
    "load_registered",
    "make_logger",
    "on_rank_zero",
    "per_row_loss",
    "predictions_frame",
    "promote",
    "read_split",
    "resolve_model",
    "run",
    "score",
    "tracking_uri",
    "world_rank",
]
