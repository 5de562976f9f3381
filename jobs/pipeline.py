"""The whole lifecycle as one Ray job: ingest → tune → train → register → export (→ serve).

Run: python jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml [-v] [section.field=value ...]
  or fabric submit jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.pipeline import run
from fabric.cli.stage import job_main


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, run the pipeline, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/pipeline.py")


if __name__ == "__main__":
    sys.exit(main())
