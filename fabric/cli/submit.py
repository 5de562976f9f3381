"""`fabric submit`: a Ray job through the Job Submission API, with the project as working_dir."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fabric import runtime
from fabric.config import load_config
from fabric.errors import ConfigError, ConfigProblem, JobError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ACCEPTS_OVERRIDES = True
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STAGED = "fabric-submitted-configs"
"""Folder of the working dir a config from elsewhere is copied into for the upload (removed right after)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric submit`; trailing `section.field=value` words are config overrides."""
    p.add_argument("script", help="the job file, e.g. jobs/pipeline.py")
    p.add_argument("--config", help="pipeline YAML (from anywhere: one outside the working dir travels with the job)")
    p.add_argument("--address", help="job API URL (default: `fabric up`'s head or RAY_API_SERVER_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of streaming logs")
    p.add_argument(
        "--working-dir", default=".", help="folder uploaded with the job, its cwd; holds the script (default: current)"
    )
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="also leave out of the upload")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.set_defaults(overrides=[])


def _file(path: str, what: str) -> Path:
    """``path`` resolved against the current directory; ConfigError if it is not a file."""
    p = Path(path)
    full = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not full.is_file():
        raise ConfigError([ConfigProblem(what, f"file not found: {path}")])
    return full


def _inside(path: str, root: Path, what: str) -> str:
    """``path`` relative to ``root``; ConfigError if it is missing or outside it."""
    full = _file(path, what)
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(
            [ConfigProblem(what, f"{path} is outside the working dir {root}; pass --working-dir <a folder holding it>")]
        ) from None


@contextmanager
def staged_config(config: Path | None, root: Path) -> Iterator[str | None]:
    """The config's path as the job sees it (relative to the working dir ``root``; None without a config).

    A config inside ``root`` is uploaded with it. One from elsewhere is copied into ``root/STAGED/`` for
    the upload (named by its content, so concurrent submissions never clash) and removed when the block
    ends: the job reads its own copy, and the entrypoint stays a plain ``python jobs/... --config ...``.
    """
    inside = _relative(config, root) if config else None
    if config is None or inside is not None:
        yield inside
        return
    text = config.read_bytes()
    staged = root / STAGED / f"{config.stem}-{hashlib.sha256(text).hexdigest()[:8]}{config.suffix}"
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(text)
    try:
        yield staged.relative_to(root).as_posix()
    finally:
        staged.unlink(missing_ok=True)
        try:
            staged.parent.rmdir()
        except OSError:
            pass  # another submission's copy is still there


def _relative(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root``, or None when it is outside."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def build_entrypoint(script: str, config: str | None, overrides: list[str]) -> str:
    """The shell command the job runs, identical to what a user would pass to `ray job submit`."""
    argv = ["python", script]
    if config:
        argv += ["--config", config]
    return shlex.join(argv + list(overrides))


def run(args: argparse.Namespace) -> int:
    """Validate locally, size-check the upload, submit, then stream logs and exit with the job's outcome."""
    root = Path(args.working_dir).resolve()
    if not root.is_dir():
        raise ConfigError([ConfigProblem("--working-dir", f"not a directory: {args.working_dir}")])
    script = _inside(args.script, root, "script")
    config_file = _file(args.config, "--config") if args.config else None
    # A bad config fails here, before anything reaches the cluster.
    load_config(config_file, args.overrides)
    excludes = runtime.DEFAULT_EXCLUDES + list(args.exclude)
    size = runtime.check_working_dir(root, excludes)

    client = runtime.job_client(args.address)
    runtime_env = {"working_dir": str(root), "excludes": excludes, "env_vars": {"PYTHONUNBUFFERED": "1"}}
    with staged_config(config_file, root) as config:
        entrypoint = build_entrypoint(script, config, args.overrides)
        try:  # uploads the working dir (with a staged config) before it returns
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id)
        except Exception as e:  # the SDK raises RuntimeError/ValueError with the server's message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JobError(f"submission failed: {first}") from None
    address = args.address or runtime.default_job_address()
    print(f"Submitted {job_id} ({runtime.human_bytes(size)} uploaded): {entrypoint}", flush=True)
    if config_file and config != _relative(config_file, root):
        print(f"  config: {config_file} travels with the job as {config}", flush=True)
    print(f"  logs: fabric jobs logs {job_id} --follow   stop: fabric jobs stop {job_id}   dashboard: {address}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nStopped following; the job goes on. Stop it with: fabric jobs stop {job_id}", file=sys.stderr)
        return 130
    print(f"Job {job_id} {status.lower()}.", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def follow(client: JobSubmissionClient, job_id: str, timeout_s: float = 30.0) -> str:
    """Stream the job's logs to stdout until it ends; return its final status name."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(_tail())
    # The log stream closes when the job ends; the status can lag it by a moment.
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id).value
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
