# python benchmarks/reliability.py [--load-seconds 6] [--epochs 3]
"""Failure recovery figures, fabric vs a baseline in the same run, on a local Ray (2 CPUs).

- Serve: a replica killed under a steady load (2 client threads on 127.0.0.1). fabric's app with 2 replicas
  vs the same app with 1 (the baseline: nothing answers until Serve replaces it). Failed requests, seconds
  until Serve reports the replacement RUNNING (no operator action), and the longest time a client got no
  answer (requests can wait at the ingress instead of failing).
- Train: the training stage with a worker process killed at the start of the last epoch vs the same run
  undisturbed. Epochs recomputed (0 means it resumed from the last checkpoint) and the wall-time ratio.

The drift monitor's restart is timed by tests/integration/test_monitor_actor.py (it needs its checkpoint
written first; the figure there is "restarts with window and reference", not a speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _load(url: str, body: dict[str, Any], stop: threading.Event, records: list[tuple[float, bool]]) -> None:
    import httpx

    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                ok = client.post(url, json=body).status_code == 200
            except httpx.HTTPError:
                ok = False
            records.append((time.monotonic(), ok))
            time.sleep(0.01)


def _replica_names() -> list[str]:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and "TabularModel" in a["name"])


def _running(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["TabularModel"].replica_states
    return int({getattr(k, "value", k): n for k, n in states.items()}.get("RUNNING", 0))


def kill_replica_under_load(url: str, body: dict[str, Any], app: str, load_s: float) -> dict[str, float]:
    """Kill one replica while 2 threads post requests; figures of the disruption."""
    import ray

    before = _replica_names()
    stop, records = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(url, body, stop, records), daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(load_s / 2)
    killed = time.monotonic()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    recovered = None
    while time.monotonic() < killed + 120:
        names = _replica_names()
        if before[0] not in names and len(names) == len(before) and _running(app) == len(before):
            recovered = time.monotonic()
            break
        time.sleep(0.1)
    time.sleep(load_s / 2)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    answered = sorted(t for t, ok in records if ok)
    return {
        "requests": len(records),
        "failed": sum(not ok for _, ok in records),
        "recovery_s": (recovered - killed) if recovered else float("nan"),
        # requests may wait rather than fail (the ingress holds them until a replica is back): the longest
        # time without an answer is the outage a client sees
        "stall_s": max((b - a for a, b in zip(answered, answered[1:], strict=False)), default=float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-seconds", type=float, default=6.0, help="load around each kill (half before)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    from fabric.serve.spec import FAST_PATH_ENV

    os.environ.update(FAST_PATH_ENV)  # before Ray starts: its processes read them at start-up
    import ray

    from fabric import data, runtime, train
    from fabric.config import load_config
    from fabric.serve import deploy

    root = Path(tempfile.mkdtemp(prefix="fabric-reliability-"))
    os.environ["FABRIC_HOME"] = str(root / "home")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base = [f"run_dir={root / 'run'}", f"train.epochs={args.epochs}", "train.num_workers=2"]
        base.append("monitor.enabled=false")
        data.run(load_config(None, base))

        rows = []
        start = time.perf_counter()
        clean = train.run(load_config(None, [*base, "name=clean", "train.max_failures=0"]))
        clean_s = time.perf_counter() - start
        crash = {"fault_injection": {"epoch": args.epochs, "rank": 1, "marker": str(root / "crashed")}}
        start = time.perf_counter()
        killed = train.run(load_config(None, [*base, "name=killed", "train.max_failures=1"]), loop_overrides=crash)
        killed_s = time.perf_counter() - start
        assert (root / "crashed").is_file(), "the worker was never killed"
        redone = args.epochs - 1 - killed.history[-1]["resumed_from_epoch"]
        note = f"epochs redone {redone}, finished epoch {killed.metrics['epoch']}"
        rows.append(("train: worker killed in last epoch", f"{killed_s:.1f} s", f"{clean_s:.1f} s (undisturbed)",
                     f"{killed_s / clean_s:.2f}x", note))  # fmt: skip

        width = len(data.load_meta(root / "run" / "data")["feature_names"])
        body = {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32", "data": [0.0] * width}]}
        port = runtime.free_port()
        figures = {}
        for replicas in (1, 2):
            cfg = load_config(
                None,
                [*base, f"serve.port={port}", f"serve.model_uri={clean.model_path}", "serve.model_name=bench",
                 f"serve.num_replicas={replicas}", "serve.replica_cpus=0"],
            )  # fmt: skip
            result = deploy(cfg, timeout_s=240)
            figures[replicas] = kill_replica_under_load(
                f"{result.url}/v2/models/bench/infer", body, cfg.serve.app_name, args.load_seconds
            )
        two, one = figures[2], figures[1]
        for name, key, unit in (("failed requests", "failed", ""), ("recovery", "recovery_s", " s"),
                                ("longest time without an answer", "stall_s", " s")):  # fmt: skip
            ratio = two[key] / one[key] if one[key] else float("nan")
            rows.append((f"serve: replica killed, {name}", f"{two[key]:.1f}{unit}", f"{one[key]:.1f}{unit} (1 replica)",
                         f"{ratio:.2f}x", f"of {two['requests']:.0f} / {one['requests']:.0f} requests"))  # fmt: skip
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    header = ("scenario", "fabric", "baseline", "ratio", "notes")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
