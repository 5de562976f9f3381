"""`fabric serve`: serve a config's model over HTTP, change its traffic split, show its status.

    fabric serve jobs/configs/serve_smoke.yaml serve.port=8001   # deploy and keep it up (Ctrl-C stops it)
    fabric serve set-traffic v1=90 v2=10                        # new weights, no replica restarts
    fabric serve status

Without a configured cluster (``cluster.address``, RAY_ADDRESS) or a running `fabric up` head, a local
Ray is started here with the Serve fast path (HAProxy ingress, gRPC data plane) and lives as long as
this command.
"""

from __future__ import annotations

import argparse
import json
import time

ACCEPTS_OVERRIDES = True
ACTIONS = ("set-traffic", "status")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric serve`."""
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG|set-traffic|status",
        help="pipeline YAML to serve (default: the built-in defaults), or an action",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides (serve.port=8001), or VERSION=WEIGHT for set-traffic")
    p.add_argument("--app", default=None, help="Serve application name for set-traffic/status (default: fabric)")
    p.add_argument("--address", default=None, help="Ray GCS address of the cluster running Serve (set-traffic/status)")
    p.add_argument("--detach", action="store_true", help="deploy on the running cluster and return (needs `fabric up` or an address)")
    p.add_argument("--json", action="store_true", help="status as JSON")


def _print_status(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no Serve applications")
    for r in rows:
        deps = "; ".join(
            f"{name} {d['status']} [{', '.join(f'{k}={v}' for k, v in sorted(d['replicas'].items())) or 'no replicas'}]"
            for name, d in r["deployments"].items()
        )
        print(f"{r['app']}  {r['status']}  {deps}")
        if r.get("traffic"):
            print("  traffic: " + ", ".join(f"{v}={w:g}" for v, w in r["traffic"].items()))
        if r.get("message"):
            print(f"  {r['message'].strip().splitlines()[-1]}")


def run(args: argparse.Namespace) -> int:
    """Deploy and keep serving, or run an action on the running Serve."""
    from fabric.errors import UsageError

    action = args.config if args.config in ACTIONS else None
    if action == "set-traffic":
        from fabric.serve.deploy import attach, set_traffic
        from fabric.serve.router import parse_weights

        if not args.overrides:
            raise UsageError("set-traffic needs VERSION=WEIGHT pairs, e.g. `fabric serve set-traffic v1=90 v2=10`")
        weights = parse_weights(args.overrides)
        attach(args.address)
        new = set_traffic(weights, args.app or "fabric")
        print("traffic now " + ", ".join(f"{v}={w:g}%" for v, w in new.items()))
        return 0
    if action == "status":
        from fabric.serve.deploy import attach, status

        if args.overrides:
            raise UsageError(f"status takes no arguments, got {' '.join(args.overrides)}")
        attach(args.address)
        _print_status(status(args.app), args.json)
        return 0

    from fabric.config import load_config
    from fabric.serve import run as serve_run
    from fabric.serve.deploy import clear_state, owns_ray

    cfg = load_config(args.config, args.overrides)
    if args.detach and owns_ray(cfg):
        raise UsageError("--detach needs a running cluster (`fabric up`, cluster.address or RAY_ADDRESS): a Ray started here ends with this command")
    result = serve_run(cfg)
    for route in result.routes:
        print(f"  {route}")
    if args.detach:
        return 0
    print("serving; Ctrl-C stops", flush=True)
    from fabric.serve.deploy import app_running, delete

    try:
        while app_running(result.app_name):
            time.sleep(2.0)
        print(f"app {result.app_name} is gone; exiting")
    except KeyboardInterrupt:
        print("stopping", flush=True)
        delete(result.app_name)
    finally:
        clear_state()
    return 0
