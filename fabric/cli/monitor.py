"""`fabric monitor`: read or reset the running drift monitor.

    fabric monitor drift [CONFIG] [--refresh]      # the last drift result as JSON (--refresh: computed now)
    fabric monitor reset [CONFIG] [overrides]      # empty the window and the last result

The monitor is the actor named ``monitor.actor_name`` of the config (``--actor`` names another, e.g. the
language model's ``llm.serve.monitor_actor``) on the cluster running Serve (``--address``, RAY_ADDRESS, the
last ``fabric serve``'s or ``fabric up``'s head). A restarted monitor restores its window from its checkpoint;
``reset`` also checkpoints the empty window, so it stays empty across restarts.
"""

from __future__ import annotations

import argparse
import json

ACCEPTS_OVERRIDES = True
ACTIONS = ("drift", "reset")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric monitor`."""
    p.add_argument("action", choices=ACTIONS, help="drift: show the last result; reset: empty the window")
    p.add_argument("config", nargs="?", help="pipeline YAML naming the monitor (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides (monitor.actor_name=...)")
    p.add_argument("--actor", default=None, help="the monitor actor's name (default: the config's monitor.actor_name)")
    p.add_argument("--address", default=None, help="Ray GCS address of the cluster running the monitor")
    p.add_argument("--refresh", action="store_true", help="drift: compute it now instead of showing the last one")


def run(args: argparse.Namespace) -> int:
    """Show the drift result, or reset the window, of the running monitor."""
    from pathlib import Path

    import ray

    from fabric.config import load_config
    from fabric.errors import FabricError
    from fabric.monitor import get_actor
    from fabric.serve.control import attach

    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]  # `fabric monitor reset monitor.actor_name=x`
        args.config = None
    cfg = load_config(args.config, args.overrides)
    name = args.actor or cfg.monitor.actor_name
    attach(args.address)
    handle = get_actor(name)
    if handle is None:
        raise FabricError(f"no drift monitor {name!r} is running in namespace 'fabric' (see `fabric status`)")
    if args.action == "drift":
        print(json.dumps(ray.get(handle.drift.remote(args.refresh), timeout=120), indent=2, default=str))
        return 0
    out = ray.get(handle.reset.remote(), timeout=60)
    print(f"drift monitor {name}: window reset ({out['rows_dropped']} rows dropped)")
    return 0
