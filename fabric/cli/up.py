"""`fabric up`: start a local Ray head for development."""

from __future__ import annotations

import argparse

from fabric import runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric up`."""
    p.add_argument("--port", type=int, default=runtime.DEFAULT_GCS_PORT, help="GCS port (default %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=runtime.DEFAULT_DASHBOARD_PORT, help="dashboard and job API port")
    p.add_argument("--num-cpus", type=int, help="CPUs the head declares (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs the head declares (default: detected)")
    p.add_argument("--object-store-memory", type=int, help="object store size in bytes")


def run(args: argparse.Namespace) -> int:
    """Start the head, or say that it is already up; print addresses and next steps."""
    for name in ("port", "dashboard_port"):
        value = getattr(args, name)
        if not 1 <= value <= 65535:
            print(f"error: --{name.replace('_', '-')} must be between 1 and 65535, got {value}")
            return 2
    print("Starting a local Ray head (token authentication on)...", flush=True)
    head, started = runtime.start_head(
        port=args.port,
        dashboard_port=args.dashboard_port,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_memory=args.object_store_memory,
    )
    if started:
        print("Ray head started.")
    else:
        print("The cluster is already up (started by `fabric up`); nothing to do.")
    url = head.dashboard_url
    print(
        f"""
  dashboard        {url}
  job submission   {url}
  ray address      {head.gcs_address}
  auth token       {head.token_location}

Next:
  fabric submit jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml
  fabric status
  fabric down

Plain Ray CLI (it sends the token only when RAY_AUTH_MODE=token is set):
  export RAY_AUTH_MODE=token
  ray job submit --address {url} --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml

The dashboard asks for the token once in the browser: print it with `ray get-auth-token`.
A remote user passes it with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token>` (or the file
~/.ray/auth_token) and reaches {url} through a tunnel, e.g. `ssh -L {url.rsplit(':', 1)[1]}:127.0.0.1:{url.rsplit(':', 1)[1]} <this host>`."""
    )
    return 0
