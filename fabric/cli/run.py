"""`fabric run`: run the whole pipeline from a config on the current Ray."""

from __future__ import annotations

import argparse


ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric run`."""
    p.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=4")


def run(args: argparse.Namespace) -> int:
    """Validate, then run every stage in order (ingest → tune → train → register → export → serve)."""
    from fabric.config import load_config
    from fabric.pipeline import run as run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg)
    return 0
