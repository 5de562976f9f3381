"""Node resource readings (CPU, memory, GPUs) from Ray's own node metrics; no sampler of fabric's.

Every Ray node's agent samples its host (psutil, NVML) and exports ``ray_node_cpu_utilization``,
``ray_node_mem_used``, ``ray_node_mem_total``, ``ray_node_gpus_utilization``, ``ray_node_gram_used``…
on the node's metrics export port (Prometheus text, ``ray.nodes()``' ``MetricsExportPort``), which is also
what Prometheus scrapes for Grafana. :func:`read_nodes` scrapes those ports for the nodes alive now, so a
node that joined after anything here started is read like the others.
"""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fabric.monitor")

MIB = 2**20
# Ray exports GPU memory in MiB (its own Grafana panels multiply by 1024 * 1024).
NODE_METRICS = (
    "ray_node_cpu_utilization",
    "ray_node_cpu_count",
    "ray_node_mem_used",
    "ray_node_mem_total",
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
    "ray_node_gram_available",
)


@dataclass
class GpuReading:
    """One GPU of a node as Ray's agent reports it."""

    index: str
    name: str = ""
    utilization_percent: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None


@dataclass
class NodeReading:
    """One node's host readings; the values are None until its agent has exported them (or when unreachable)."""

    node_id: str
    ip: str
    metrics_url: str
    is_head: bool = False
    cpu_percent: float | None = None
    cpu_count: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    gpus: list[GpuReading] = field(default_factory=list)
    error: str | None = None
    """Why the node's metrics could not be read (None when they were)."""

    @property
    def complete(self) -> bool:
        """True when CPU and memory readings are there."""
        return None not in (self.cpu_percent, self.memory_used_bytes, self.memory_total_bytes)


def parse_node_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The ``ray_node_*`` samples of a Prometheus text export: metric name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in NODE_METRICS:
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def reading_from(samples: dict[str, list[tuple[dict[str, str], float]]], reading: NodeReading) -> NodeReading:
    """Fill ``reading`` from one node's parsed export (each node's port exports that node's agent only)."""

    def one(name: str) -> float | None:
        values = samples.get(name) or []
        return values[-1][1] if values else None

    reading.cpu_percent = one("ray_node_cpu_utilization")
    reading.cpu_count = one("ray_node_cpu_count")
    reading.memory_used_bytes = one("ray_node_mem_used")
    reading.memory_total_bytes = one("ray_node_mem_total")
    gpus: dict[str, GpuReading] = {}
    for name in ("ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available"):
        for labels, value in samples.get(name) or []:
            index = labels.get("GpuIndex", "0")
            gpu = gpus.setdefault(index, GpuReading(index=index, name=labels.get("GpuDeviceName", "")))
            if name == "ray_node_gpus_utilization":
                gpu.utilization_percent = value
            elif name == "ray_node_gram_used":
                gpu.memory_used_bytes = value * MIB
            else:
                gpu.memory_total_bytes = value * MIB  # available for now; used is added below
    for gpu in gpus.values():
        if gpu.memory_total_bytes is not None and gpu.memory_used_bytes is not None:
            gpu.memory_total_bytes += gpu.memory_used_bytes
    reading.gpus = sorted(gpus.values(), key=lambda g: int(g.index) if g.index.isdigit() else 0)
    return reading


def scrape(reading: NodeReading, timeout_s: float = 5.0) -> NodeReading:
    """Read one node's export into ``reading``; an unreachable node gets ``error`` instead of raising."""
    try:
        with urllib.request.urlopen(reading.metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except OSError as e:
        reading.error = f"no metrics at {reading.metrics_url} ({getattr(e, 'reason', e)})"
        log.debug(reading.error)
        return reading
    return reading_from(parse_node_metrics(text), reading)


def targets(nodes: list[dict[str, Any]]) -> list[NodeReading]:
    """Empty readings of the alive nodes of ``ray.nodes()`` (or the GCS's node table in its shape)."""
    out = []
    for n in nodes:
        port = n.get("MetricsExportPort")
        if not n.get("Alive") or not port:
            continue
        ip = n.get("NodeManagerAddress", "127.0.0.1")
        host = f"[{ip}]" if ":" in ip else ip
        is_head = bool((n.get("Resources") or {}).get("node:__internal_head__"))
        url = f"http://{host}:{port}/metrics"
        out.append(NodeReading(node_id=n["NodeID"], ip=ip, metrics_url=url, is_head=is_head))
    return out


def read_nodes(nodes: list[dict[str, Any]] | None = None, timeout_s: float = 5.0) -> list[NodeReading]:
    """Host readings of every alive node, scraped now from Ray's metrics exports.

    Args:
        nodes: ``ray.nodes()``-shaped node records (default: ``ray.nodes()``; Ray must be connected).
        timeout_s: per-node scrape timeout.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    readings = targets(nodes)
    if not readings:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(readings))) as pool:
        return list(pool.map(lambda r: scrape(r, timeout_s), readings))
