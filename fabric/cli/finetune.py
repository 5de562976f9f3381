"""`fabric finetune`: LoRA fine-tuning of a causal language model on Ray Train (the `llm` section)."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric finetune`."""
    p.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. llm.finetune.epochs=4")


def run(args: argparse.Namespace) -> int:
    """Validate, then fine-tune; the outputs land under ``<run_dir>/llm/``."""
    from fabric.config import load_config
    from fabric.pipeline import finetune

    cfg = load_config(args.config, args.overrides)
    finetune(cfg)
    return 0
