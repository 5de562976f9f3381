"""`fabric predict`: batch scoring of a file or URI with a registered model, on Ray Data.

    fabric predict jobs/configs/predict_smoke.yaml --input rows.csv --output scored.parquet
    fabric predict my.yaml --input s3://bucket/rows/ --output s3://bucket/scored.csv --version 3
    fabric predict my.yaml --input rows.parquet --output out.parquet --alias candidate predict.keep_columns=[id]

The model is ``track.model_name``'s ``champion`` unless ``--version`` or ``--alias`` says otherwise. Without a
cluster, a local Ray is started here and ends with the command.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric predict`."""
    p.add_argument("config", nargs="?", help="pipeline YAML (track.model_name names the model; predict section)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. predict.keep_columns=[id]")
    p.add_argument("--input", help="rows to score: parquet, CSV or JSON lines; a file, folder or URI (predict.input)")
    p.add_argument("--output", help="where predictions go: a folder of parquet, or CSV when it ends in .csv")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="registry version to score with (default: the champion)")
    which.add_argument("--alias", help="registry alias to score with, e.g. candidate (default: champion)")


def run(args: argparse.Namespace) -> int:
    """Validate and score; the scoring logs one line: rows, output, model and version."""
    from fabric.cli import config_and_overrides
    from fabric.config import load_config
    from fabric.errors import DataValidationError, UsageError
    from fabric.predict import score

    if args.version is not None and args.version < 1:
        raise UsageError(f"--version must be 1 or more, got {args.version}")
    config, overrides = config_and_overrides(args)
    cfg = load_config(config, overrides)
    try:
        score(cfg, args.input, args.output, args.version, args.alias)
    except DataValidationError as e:  # the input given is bad: bad input, like a bad argument
        raise UsageError(str(e)) from None
    return 0
