"""`fabric tune`: the search stage alone, with `--resume` for an interrupted search."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric tune`."""
    p.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=16")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search of the same name")


def run(args: argparse.Namespace) -> int:
    """Validate, then search (ingestion must have written the run's data folder)."""
    from fabric.config import load_config
    from fabric.tune import run as tune

    cfg = load_config(args.config, args.overrides)
    tune(cfg, resume=args.resume)
    return 0
