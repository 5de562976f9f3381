"""The language-model serving stage as a Ray job: deploy the OpenAI-compatible app on Serve and exit (it stays up).

Run: python jobs/serve_llm.py --config jobs/configs/llm_serve_smoke.yaml llm.serve.port=8001
"""

from __future__ import annotations

import sys

from fabric.cli import verbosity
from fabric.cli.stage import job_main
from fabric.serve.llm import run


def main(argv: list[str] | None = None) -> int:
    """Parse --config and overrides, deploy the app, return the exit code."""
    return job_main(run, verbosity.from_argv(argv), prog="jobs/serve_llm.py")


if __name__ == "__main__":
    sys.exit(main())
