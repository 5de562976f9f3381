"""The search stage as a Ray job (ingestion must have written the run's data folder).

Run: python jobs/tune.py --config jobs/configs/pipeline_smoke.yaml [section.field=value ...]
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.cli.stage import job_main
from fabric.tune import run


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, run the search, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/tune.py")


if __name__ == "__main__":
    sys.exit(main())
