"""LoRA fine-tuning of a causal language model as a Ray job (Ray Train DDP or DeepSpeed; outputs under
<run_dir>/llm/ for the OpenAI-compatible endpoint); with llm.eval.after_finetune=true, then lm-evaluation-harness
on the base and the new adapter.

Run: python jobs/finetune.py --config jobs/configs/llm_smoke.yaml [section.field=value ...]
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.pipeline import finetune
from fabric.cli.stage import job_main


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, fine-tune, return the exit code."""
    return job_main(finetune, verbosity.from_argv(argv), prog="jobs/finetune.py")


if __name__ == "__main__":
    sys.exit(main())
