"""The export stage as a Ray job: the registry's champion (else <run_dir>/train/model) to ONNX.

Run: python jobs/export.py --config jobs/configs/pipeline_smoke.yaml [export.quantize=true ...]
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.export import run
from fabric.cli.stage import job_main


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, export and check parity, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/export.py")


if __name__ == "__main__":
    sys.exit(main())
