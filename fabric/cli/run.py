"""`fabric run`: run the whole pipeline from a config on the current Ray."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True
_STAGES = ("ingest", "tune", "export")  # fabric.pipeline.CACHED_STAGES, without importing the pipeline for --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric run`."""
    p.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=4")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        choices=_STAGES,
        metavar="STAGE",
        help=f"run this stage even when its step record matches ({', '.join(_STAGES)}; repeatable)",
    )
    p.add_argument("--no-cache", action="store_true", help="run every stage, ignoring the step records")


def run(args: argparse.Namespace) -> int:
    """Validate, then run every stage in order (ingest → tune → train → register → export → serve), skipping
    the cached ones."""
    from fabric.config import load_config
    from fabric.pipeline import run as run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg, cache=not args.no_cache, force=tuple(args.force))
    return 0
