"""Batch generation as a Ray job: prompts through vLLM engines on Ray Data, to a file.

Run: python jobs/generate.py --config jobs/configs/llm_serve_smoke.yaml \
         llm.generate.input=prompts.jsonl llm.generate.output=out.parquet
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.config import PipelineConfig
from fabric.predict import generate
from fabric.cli.stage import job_main
from fabric.runtime import connect
from fabric.serve.llm.app import resolved


def batch_generate(cfg: PipelineConfig) -> None:
    """Generate for every prompt of ``llm.generate.input`` with ``llm.serve``'s model."""
    connect(cfg.cluster)
    result = generate(cfg, resolved(cfg)["model_path"])
    print(f"generate: {result.rows} prompts -> {result.output} ({result.generated_tokens} tokens)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, generate, return the exit code."""
    return job_main(batch_generate, verbosity.from_argv(argv), prog="jobs/generate.py")


if __name__ == "__main__":
    sys.exit(main())
