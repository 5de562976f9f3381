"""Batch scoring as a Ray job: a file or URI through the registered model (champion by default), to files.

Run: python jobs/predict.py --config jobs/configs/predict_smoke.yaml \
         predict.input=rows.parquet predict.output=scored.parquet [predict.version=3 | predict.alias=candidate]
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.config import PipelineConfig
from fabric.predict import score
from fabric.cli.stage import job_main
from fabric.runtime import connect


def batch_score(cfg: PipelineConfig) -> None:
    """Score ``predict.input`` with ``track.model_name``'s model into ``predict.output``."""
    connect(cfg.cluster)
    score(cfg)  # logs its summary line


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, score, return the exit code."""
    return job_main(batch_score, verbosity.from_argv(argv), prog="jobs/predict.py")


if __name__ == "__main__":
    sys.exit(main())
