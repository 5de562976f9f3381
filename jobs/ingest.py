"""Ingestion job: read, check, split and encode the data with Ray Data; write splits and drift reference.

python jobs/ingest.py [--config PIPELINE.yaml] [data.source=PATH_OR_URI data.target=COLUMN ...]
ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/ingest.py run_dir=runs/demo
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.data import run
from fabric.cli.stage import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(run, verbosity.from_argv(argv), prog="jobs/ingest.py")


if __name__ == "__main__":
    sys.exit(main())
