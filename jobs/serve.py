"""The serve stage as a Ray job: deploy the config's model on Serve and exit (the app stays up).

Run: python jobs/serve.py --config jobs/configs/pipeline_smoke.yaml serve.model_uri=models:/fabric-smoke@champion
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.cli.stage import job_main
from fabric.serve import run


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, deploy the app, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/serve.py")


if __name__ == "__main__":
    sys.exit(main())
