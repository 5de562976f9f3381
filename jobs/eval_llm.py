"""The evaluation stage as a Ray job: lm-evaluation-harness against the served model, scores to MLflow.

Run: python jobs/eval_llm.py --config jobs/configs/llm_serve_smoke.yaml llm.eval.limit=20
(deploys llm.serve's app first unless llm.eval.url names a running one)
"""

from __future__ import annotations

import sys

from fabric import evaluate
from fabric.cli import verbosity
from fabric.config import PipelineConfig
from fabric.cli.stage import job_main
from fabric.serve.llm import deploy


def eval_llm(cfg: PipelineConfig) -> None:
    """Evaluate the app at ``llm.eval.url``, or at the one deployed here from ``llm.serve``."""
    print(evaluate.run(cfg, cfg.llm.eval.url or deploy(cfg)).report(), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, evaluate, return the exit code."""
    return job_main(eval_llm, verbosity.from_argv(argv), prog="jobs/eval_llm.py")


if __name__ == "__main__":
    sys.exit(main())
