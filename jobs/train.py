"""The training stage as a Ray job (ingestion must have written the run's data folder).

Run: python jobs/train.py --config jobs/configs/pipeline_smoke.yaml [section.field=value ...]
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.cli.stage import job_main
from fabric.train import run


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, train, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/train.py")


if __name__ == "__main__":
    sys.exit(main())
