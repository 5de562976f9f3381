"""`fabric jobs list|logs|stop`: the Ray jobs of a cluster."""

from __future__ import annotations

import argparse
import datetime as dt

from fabric import runtime
from fabric.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric jobs`."""
    p.add_argument("--address", help="job API URL (default: `fabric up`'s head or RAY_API_SERVER_ADDRESS)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    ls = sub.add_parser("list", help="submitted jobs, newest first")
    ls.add_argument("--limit", type=int, default=20, help="how many to show (default %(default)s)")
    logs = sub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = sub.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    end_ms = end or int(dt.datetime.now().timestamp() * 1000)
    return f"{(end_ms - start) / 1000:.0f}s"


def submitted_jobs(client, limit: int) -> list:  # type: ignore[no-untyped-def]
    """Jobs submitted through the Job API (not interactive drivers), newest first."""
    jobs = [j for j in client.list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    return jobs[:limit]


def format_jobs(jobs: list) -> str:  # type: ignore[type-arg]
    """A fixed-width table of jobs."""
    if not jobs:
        return "no jobs"
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for j in jobs:
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        rows.append((j.submission_id, j.status.value, _when(j.start_time), _duration(j.start_time, j.end_time), entry))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows)


def _known(client, job_id: str) -> None:  # type: ignore[no-untyped-def]
    try:
        client.get_job_info(job_id)
    except Exception:  # the SDK raises RuntimeError for an unknown id
        raise UsageError(f"no job with id {job_id!r}; see `fabric jobs list`") from None


def run(args: argparse.Namespace) -> int:
    """Dispatch to list, logs or stop."""
    client = runtime.job_client(args.address)
    if args.action == "list":
        print(format_jobs(submitted_jobs(client, args.limit)))
        return 0
    _known(client, args.job_id)
    if args.action == "logs":
        if args.follow:
            from fabric.cli.submit import follow

            status = follow(client, args.job_id)
            print(f"Job {args.job_id} {status.lower()}.")
            return 0 if status == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"Stop requested for {args.job_id}." if stopped else f"{args.job_id} had already ended.")
    return 0
