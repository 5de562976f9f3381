"""`fabric status [CONFIG]`: nodes with resources used and free, jobs, and Serve applications; with a pipeline
config, first the registry's champion and candidate and the data that made each.

Host readings (CPU, memory, GPU) are Ray's own node metrics (``ray_node_*``), scraped from each node's metrics
export port (the dashboard's copy of the same agent samples where that port does not answer from here); Ray's
logical resources (what tasks and actors hold) come from the GCS.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections import Counter
from typing import TYPE_CHECKING, Any

from fabric import runtime
from fabric.errors import ClusterError

if TYPE_CHECKING:
    from fabric.monitor.resources import NodeReading

GIB = 2**30
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric status`."""
    p.add_argument("config", nargs="?", help="pipeline YAML: also show its model's champion and the data that made it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run_dir=s3://bucket/runs/smoke")
    p.add_argument("--address", help="dashboard URL (default: `fabric up`'s head or RAY_API_SERVER_ADDRESS)")
    p.add_argument("--gcs", help="GCS host:port for logical resource use (default: `fabric up`'s head)")
    p.add_argument("--jobs", type=int, default=5, help="recent jobs to show (default %(default)s)")


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers=runtime.auth_headers())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _gcs_address(args: argparse.Namespace) -> str | None:
    if args.gcs:
        return args.gcs
    head = runtime.read_head()
    if head and not args.address:
        return head.gcs_address
    addr = os.environ.get("RAY_ADDRESS", "")
    return addr if addr and "://" not in addr and addr != "auto" else None


def logical_usage(gcs: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Per node id: resource -> (used, total), from the GCS's cluster resource state."""
    runtime.use_token_auth()
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for node in [*status.active_nodes, *status.idle_nodes]:
        usage = node.resource_usage.usage if node.resource_usage else []
        out[node.node_id] = {u.resource_name: (u.used, u.total) for u in usage}
    return out


def _fmt_pair(used: float, total: float, scale: float = 1.0, unit: str = "") -> str:
    return f"{used / scale:.1f}/{total / scale:.1f}{unit}"


def host_readings(nodes: list[dict[str, Any]]) -> dict[str, NodeReading]:
    """Node id -> its ``ray_node_*`` readings, for the alive nodes of the dashboard's node summary."""
    from fabric.monitor.resources import read_nodes

    records = [
        {
            "NodeID": r.get("nodeId", ""),
            "Alive": r.get("state") == "ALIVE",
            "NodeManagerAddress": r.get("nodeManagerAddress") or n.get("ip", "127.0.0.1"),
            "MetricsExportPort": r.get("metricsExportPort"),
        }
        for n in nodes
        if (r := n.get("raylet") or {})
    ]
    return {reading.node_id: reading for reading in read_nodes(records)}


def _host_text(n: dict[str, Any], reading: NodeReading | None) -> tuple[str, str, str]:
    """Host CPU, memory and GPUs of a node: Ray's node metrics, else the dashboard's summary of the same samples."""
    if reading is not None and reading.complete:
        gpus = ", ".join(
            f"{g.name or 'gpu'} {g.utilization_percent or 0:.0f}% "
            f"{(g.memory_used_bytes or 0) / GIB:.1f}/{(g.memory_total_bytes or 0) / GIB:.1f}GiB"
            for g in reading.gpus
        )
        mem = _fmt_pair(reading.memory_used_bytes or 0.0, reading.memory_total_bytes or 0.0, GIB, " GiB")
        return f"{reading.cpu_percent:.0f}%", mem, gpus or "-"
    mem_summary = n.get("mem") or [0, 0, 0, 0]  # psutil.virtual_memory(): total, available, percent, used
    gpu_summary = n.get("gpus") or []  # pynvml readings
    gpu_text = ", ".join(
        f"{g.get('name', 'gpu')} {g.get('utilizationGpu') or 0:.0f}% "
        f"{(g.get('memoryUsed') or 0) / 1024:.1f}/{(g.get('memoryTotal') or 0) / 1024:.1f}GiB"
        for g in gpu_summary
    )
    mem = _fmt_pair(mem_summary[0] - mem_summary[1], mem_summary[0], GIB, " GiB")
    return f"{n.get('cpu', 0):.0f}%", mem, gpu_text or "-"


def node_rows(
    nodes: list[dict[str, Any]],
    usage: dict[str, dict[str, tuple[float, float]]] | None,
    readings: dict[str, NodeReading] | None = None,
) -> list[tuple[str, ...]]:
    """One row per node: address, role, state, Ray CPU/GPU use, host CPU%, host memory, GPUs."""
    rows = [("NODE", "STATE", "RAY CPU used/total", "RAY GPU used/total", "HOST CPU", "HOST MEM used/total", "GPUS")]
    for n in nodes:
        raylet = n.get("raylet", {})
        total = raylet.get("resourcesTotal", {})
        use = (usage or {}).get(raylet.get("nodeId", ""), {})
        cpu_used = use.get("CPU", (None, total.get("CPU", 0.0)))[0]
        gpu_used = use.get("GPU", (None, total.get("GPU", 0.0)))[0]
        cpu = _fmt_pair(cpu_used, total.get("CPU", 0.0)) if cpu_used is not None else f"?/{total.get('CPU', 0.0):.1f}"
        gpu = _fmt_pair(gpu_used or 0.0, total["GPU"]) if total.get("GPU") else "-"
        host_cpu, host_mem, gpu_text = _host_text(n, (readings or {}).get(raylet.get("nodeId", "")))
        role = " (head)" if raylet.get("isHeadNode") else ""
        rows.append((f"{n.get('ip', '?')}{role}", raylet.get("state", "?"), cpu, gpu, host_cpu, host_mem, gpu_text))
    return rows


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def serve_lines(apps: dict[str, Any]) -> list[str]:
    """One line per Serve application with its deployments' replica states."""
    out = []
    for name, app in sorted(apps.items()):
        deps = []
        for dep_name, dep in (app.get("deployments") or {}).items():
            states = Counter(r.get("state", "?") for r in dep.get("replicas") or [])
            replica_text = ", ".join(f"{s}={c}" for s, c in sorted(states.items())) or "no replicas"
            deps.append(f"{dep_name} {dep.get('status', '?')} [{replica_text}]")
        out.append(f"  {name}  {app.get('status', '?')}  {app.get('route_prefix') or ''}  " + "; ".join(deps))
    return out


def registry_lines(entries: list[dict[str, Any]], model: str, where: str) -> list[str]:
    """The registry section: each alias's version and its data (source, source digest, split digests)."""
    lines = [f"Registry {where}"]
    if not entries:
        return [*lines, f"  {model}: no champion or candidate yet"]
    for e in entries:
        data = e["data"]
        lines.append(f"  {e['name']}@{e['alias']}  v{e['version']}")
        if not data:
            lines.append("    data: not recorded (registered before lineage)")
            continue
        lines.append(f"    data    {data.get('source', '?')}  digest {str(data.get('source_digest', '?'))[:16]}")
        splits = [f"{s} {data[f'{s}_digest'][:16]}" for s in ("train", "val", "test") if f"{s}_digest" in data]
        if splits:
            lines.append(f"    splits  {', '.join(splits)}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Print the registry's champion and its data (with a config), then the cluster's nodes, resources, jobs and
    Serve applications."""
    if args.config or args.overrides:
        from fabric.cli import config_and_overrides
        from fabric.config import load_config
        from fabric.tracking import data_lineage, tracking_uri

        config, overrides = config_and_overrides(args)
        cfg = load_config(config, overrides)
        model = cfg.track.model_name
        for line in registry_lines(data_lineage(cfg), model, tracking_uri(cfg)):
            print(line)
        print()
    url = args.address or runtime.default_job_address()
    try:
        summary = _get(f"{url}/nodes?view=summary")
    except urllib.error.HTTPError as e:
        raise ClusterError(f"the dashboard at {url} answered {e.code}: is the auth token ({runtime.token_location()}) the cluster's?") from None
    except OSError as e:
        raise ClusterError(f"no Ray dashboard at {url} ({getattr(e, 'reason', e)}); start one with `fabric up`") from None
    nodes = summary.get("data", {}).get("summary", [])
    gcs = _gcs_address(args)
    usage = None
    if gcs:
        try:
            usage = logical_usage(gcs)
        except Exception as e:  # status still shows everything else when the GCS is not reachable from here
            print(f"(logical resource use unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    alive = sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")
    print(f"Cluster {url}  {alive} node(s) alive")
    print(table(node_rows(nodes, usage, host_readings(nodes))))
    if usage:
        totals: dict[str, list[float]] = {}
        for res in usage.values():
            for k, (used, total) in res.items():
                t = totals.setdefault(k, [0.0, 0.0])
                t[0] += used
                t[1] += total
        parts = []
        for key, scale, unit in (("CPU", 1, ""), ("GPU", 1, ""), ("memory", GIB, " GiB"), ("object_store_memory", GIB, " GiB")):
            used, total = totals.get(key, [0.0, 0.0])
            parts.append(f"{key} {used / scale:.1f} used, {(total - used) / scale:.1f} free of {total / scale:.1f}{unit}")
        print("Resources: " + "; ".join(parts))

    from fabric.cli.jobs import format_jobs, submitted_jobs

    client = runtime.job_client(url)
    jobs = submitted_jobs(client, limit=1000)
    running = [j for j in jobs if j.status.value in ("PENDING", "RUNNING")]
    recent = [j for j in jobs if j not in running][: args.jobs]
    print(f"\nJobs: {len(running)} running, {len(jobs)} submitted")
    if running or recent:
        print(format_jobs(running + recent))

    try:
        apps = _get(f"{url}/api/serve/applications/").get("applications") or {}
    except OSError:
        apps = {}
    print(f"\nServe applications: {len(apps) or 'none'}")
    for line in serve_lines(apps):
        print(line)
    return 0
