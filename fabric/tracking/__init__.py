"""Tracking and the model registry: the MetricLogger seam (MLflow, W&B), rank-0 guards, promotion, the trivial
baseline, and run keys (digests of settings and inputs).

Importing this package loads neither mlflow nor wandb nor torch; each adapter imports its library when
it is created and names the extra that installs it when missing.
"""

from fabric.tracking._baseline import Baseline, beats, fit_baseline
from fabric.tracking._lineage import (
    digest_json,
    digest_source,
    digest_splits,
    run_key,
    source_digest,
    split_digests,
)
from fabric.tracking._lm import AdapterRegistration, log_finetune, registered_adapter
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
    data_lineage,
    version_of_run,
    load_registered,
    promote,
    resolve_model,
    run,
)

__all__ = [
    "AdapterRegistration",
    "Baseline",
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
    "beats",
    "compare",
    "data_dir",
    "data_lineage",
    "decide",
    "digest_json",
    "digest_source",
    "digest_splits",
    "source_digest",
    "split_digests",
    "fit_baseline",
    "headline",
    "is_rank_zero",
    "log_finetune",
    "load_registered",
    "make_logger",
    "on_rank_zero",
    "per_row_loss",
    "predictions_frame",
    "promote",
    "registered_adapter",
    "read_split",
    "resolve_model",
    "run",
    "run_key",
    "score",
    "tracking_uri",
    "version_of_run",
    "world_rank",
]
