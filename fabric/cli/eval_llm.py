"""`fabric eval-llm`: lm-evaluation-harness against the served language model (the base and each adapter).

    fabric eval-llm jobs/configs/llm_serve_smoke.yaml                  # deploys llm.serve's app, then evaluates it
    fabric eval-llm my.yaml llm.eval.url=http://127.0.0.1:8000 llm.eval.limit=20

Scores go to the MLflow run of the registered adapter; ``llm.eval.promote_metric`` makes the adapter ``champion``
only when it is not worse than the base. Without a cluster, a local Ray is started here and ends with the command.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric eval-llm`."""
    p.add_argument("config", nargs="?", help="pipeline YAML with llm.serve and llm.eval sections")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. llm.eval.limit=20")


def run(args: argparse.Namespace) -> int:
    """Deploy the app unless ``llm.eval.url`` names one, then evaluate it."""
    from fabric import evaluate
    from fabric.cli import config_and_overrides
    from fabric.config import load_config
    from fabric.serve.llm import deploy

    config, overrides = config_and_overrides(args)
    cfg = load_config(config, overrides)
    print(evaluate.run(cfg, cfg.llm.eval.url or deploy(cfg)).report(), flush=True)
    return 0
