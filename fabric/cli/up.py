"""`fabric up`: start a local Ray head for development, or the head of a multi-node cluster."""

from __future__ import annotations

import argparse
import json

from fabric import runtime
from fabric.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric up`."""
    p.add_argument("--port", type=int, default=runtime.DEFAULT_GCS_PORT, help="GCS port (default %(default)s)")
    p.add_argument(
        "--dashboard-port", type=int, default=runtime.DEFAULT_DASHBOARD_PORT, help="dashboard and job API port"
    )
    p.add_argument(
        "--node-ip",
        help="address worker nodes reach this head on (Ray then binds its ports there or on every interface); "
        "default: a development head with every port on 127.0.0.1. The dashboard and job API stay on 127.0.0.1",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs the head declares (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs the head declares (default: detected)")
    p.add_argument("--resources", help='custom resources the head declares, as JSON, e.g. \'{"head_node": 1}\'')
    p.add_argument("--object-store-memory", type=int, help="object store size in bytes")
    p.add_argument(
        "--redis",
        metavar="HOST:PORT",
        help="GCS fault tolerance: keep the cluster's state in this Redis (REDIS_PASSWORD: its password) and "
        "restart the GCS when it dies; Serve's replicas keep answering meanwhile",
    )
    p.add_argument(
        "--no-serve-fast-path",
        action="store_true",
        help="leave Serve's HAProxy ingress and direct data plane off on this head",
    )


def _resources(text: str | None) -> dict[str, float]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--resources: not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    return runtime.check_resources(value)


def _serve_env(disabled: bool) -> dict[str, str]:
    """Serve's fast-path variables, which Ray reads when the head's processes start (so now, not later)."""
    if disabled:
        return {}
    # Imported here: fabric.runtime must not depend on fabric.serve (DESIGN.md's dependency direction).
    from fabric.config import PipelineConfig
    from fabric.serve.spec import FAST_PATH_ENV, fast_path_env, fast_path_ports_env

    env = fast_path_env(PipelineConfig())  # empty where the HAProxy binary is missing
    if not env:
        return {}
    # HAProxy's metrics and stats listeners and the fallback proxy default to fixed ports (9101, 8404, 8500, 9500)
    # and the replicas' direct-ingress ports to fixed ranges: free ones, so this head's Serve never collides with
    # another Serve on the machine.
    return {**{k: v for k, v in FAST_PATH_ENV.items() if k in env}, **fast_path_ports_env()}


def listening_lines(listening: list[tuple[str, int, str]]) -> str:
    """One line per address: the ports on it and which process holds each; a closing line says whether any
    port is reachable from beyond this machine."""
    by_address: dict[str, list[str]] = {}
    for address, port, label in listening:
        by_address.setdefault(address, []).append(f"{port} {label}")
    names = {"0.0.0.0": "0.0.0.0 (every IPv4 interface)", "::": ":: (every interface)"}
    lines = [f"  {names.get(a, a):<16} " + ", ".join(ports) for a, ports in sorted(by_address.items())]
    if not lines:
        return "  (no listening socket found)"
    beyond = sorted({a for a in by_address if a not in runtime.LOOPBACK_IPS})
    if beyond:
        lines.append(f"  reachable from other machines on: {', '.join(beyond)}")
    else:
        lines.append("  every port is on loopback: reachable from this machine only")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Start the head, or say that it is already up; print addresses, how workers join, and next steps."""
    for name in ("port", "dashboard_port"):
        value = getattr(args, name)
        if not 1 <= value <= 65535:
            raise UsageError(f"--{name.replace('_', '-')} must be between 1 and 65535, got {value}")
    for name in ("num_cpus", "num_gpus", "object_store_memory"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    resources = _resources(args.resources)
    if args.node_ip is not None:
        runtime.check_node_ip(args.node_ip)
    env = _serve_env(args.no_serve_fast_path)
    print("Starting a Ray head (token authentication on)...", flush=True)
    head, started = runtime.start_head(
        port=args.port,
        dashboard_port=args.dashboard_port,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_memory=args.object_store_memory,
        node_ip=args.node_ip,
        resources=resources,
        env=env,
        redis=args.redis,
    )
    if started:
        print("Ray head started.")
    else:
        print("The cluster is already up (started by `fabric up`); nothing to do.")
    url = head.dashboard_url
    port = url.rsplit(":", 1)[1]
    fast = " ".join(f"{k}={v}" for k, v in sorted(head.env.items())) or "off"
    declared = json.dumps(head.resources) if head.resources else "none"
    if head.redis:
        ft = (
            f"on: state in Redis {head.redis} (namespace {head.storage_namespace}); a supervisor (pid "
            f"{head.supervisor_pid}, log {runtime.fabric_home() / 'gcs-supervisor.log'}) restarts the GCS if it dies"
        )
    else:
        ft = "off (`fabric up --redis HOST:PORT` turns it on)"
    listening = runtime.head_listeners(head)
    gcs_note = ""
    if head.local_only:
        env = " ".join(f"{k}={v}" for k, v in runtime.LOOPBACK_ENV.items())
        gcs_note = (
            f"  (to the GCS address, e.g. ray.init(address=\"{head.gcs_address}\") or `ray status`, also export\n"
            f"  {env}: Ray otherwise turns 127.0.0.1 into this machine's network address, where this head does\n"
            "  not listen)\n"
        )
    if head.local_only:
        join = "  (a development head: to add nodes, start it with --node-ip <this host's address>)"
    else:
        join = (
            f"  copy {head.token_location} to the worker's ~/.ray/auth_token (or set RAY_AUTH_TOKEN there;\n"
            f"  `ray get-auth-token` prints it), then run on the worker:\n  {runtime.join_command(head)}"
        )
    print(
        f"""
  dashboard        {url}
  job submission   {url}
  ray address      {head.gcs_address}
  ray client       ray://{head.node_ip}:{head.client_port}
  auth token       {head.token_location}
  resources        {declared}
  serve fast path  {fast}
  gcs fault tol.   {ft}

Listening now (the head's processes, read from the system):
{listening_lines(listening)}

Join a worker node:
{join}

Next:
  fabric submit jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml
  fabric status
  fabric down

Plain Ray CLI (it sends the token only when RAY_AUTH_MODE=token is set):
  export RAY_AUTH_MODE=token
  ray job submit --address {url} --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml
{gcs_note}
The dashboard asks for the token once in the browser: print it with `ray get-auth-token`.
A remote user passes it with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token>` (or the file
~/.ray/auth_token) and reaches {url} through a tunnel, e.g. `ssh -L {port}:127.0.0.1:{port} <this host>`."""
    )
    return 0
