"""Node readings from Ray's metrics export, without Ray: a real HTTP server on loopback serves an export in the
exact text format a Ray 2.60 node's metrics port writes (label sets copied from one)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from fabric.monitor.resources import MIB, NodeReading, parse_node_metrics, read_nodes, reading_from, targets

_NODE = 'IsHeadNode="true",RayNodeType="head",SessionName="session_x",Version="2.60.0",ip="10.0.0.1"'
_GPU = _NODE + ',GpuDeviceName="NVIDIA H100 80GB HBM3",GpuIndex="{i}",GpuUuid="GPU-{i}"'
EXPORT = "\n".join(
    [
        "# HELP ray_node_cpu_utilization Total CPU usage on a ray node",
        "# TYPE ray_node_cpu_utilization gauge",
        f"ray_node_cpu_utilization{{{_NODE}}} 37.5",
        "# TYPE ray_node_cpu_count gauge",
        f"ray_node_cpu_count{{{_NODE}}} 16.0",
        "# TYPE ray_node_mem_used gauge",
        f"ray_node_mem_used{{{_NODE}}} 3.948388352e+09",
        "# TYPE ray_node_mem_total gauge",
        f"ray_node_mem_total{{{_NODE}}} 2.5276182528e+10",
        "# TYPE ray_node_mem_used_host gauge",  # another series of the same prefix: not taken for mem_used
        f"ray_node_mem_used_host{{{_NODE}}} 1.0",
        "# TYPE ray_node_gpus_utilization gauge",
        f"ray_node_gpus_utilization{{{_GPU.format(i=1)}}} 80.0",
        f"ray_node_gpus_utilization{{{_GPU.format(i=0)}}} 40.0",
        "# TYPE ray_node_gram_used gauge",
        f"ray_node_gram_used{{{_GPU.format(i=0)}}} 1024.0",
        f"ray_node_gram_used{{{_GPU.format(i=1)}}} 2048.0",
        "# TYPE ray_node_gram_available gauge",
        f"ray_node_gram_available{{{_GPU.format(i=0)}}} 80896.0",
        f"ray_node_gram_available{{{_GPU.format(i=1)}}} 79872.0",
        "# TYPE ray_serve_num_http_requests_total counter",
        'ray_serve_num_http_requests_total{route="/"} 3.0',
        "",
    ]
)


@pytest.fixture(scope="module")
def exporter() -> Iterator[int]:
    """A metrics port answering EXPORT on /metrics (404 elsewhere), on 127.0.0.1."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = EXPORT.encode() if self.path == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _node(node_id: str, port: int | None, alive: bool = True, head: bool = False) -> dict[str, object]:
    resources = {"CPU": 1.0, **({"node:__internal_head__": 1.0} if head else {})}
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "127.0.0.1",
        "MetricsExportPort": port,
        "Resources": resources,
    }


def test_a_ray_export_is_read_into_cpu_memory_and_each_gpu() -> None:
    samples = parse_node_metrics(EXPORT)
    assert "ray_serve_num_http_requests_total" not in samples and "ray_node_mem_used_host" not in samples
    r = reading_from(samples, NodeReading(node_id="n", ip="10.0.0.1", metrics_url="-"))
    assert (r.cpu_percent, r.cpu_count) == (37.5, 16.0)
    assert (r.memory_used_bytes, r.memory_total_bytes) == (3948388352.0, 25276182528.0) and r.complete
    assert [g.index for g in r.gpus] == ["0", "1"]  # sorted by index, whatever the export's order
    g0, g1 = r.gpus
    assert g0.name == "NVIDIA H100 80GB HBM3" and (g0.utilization_percent, g1.utilization_percent) == (40.0, 80.0)
    # Ray exports GPU memory in MiB; total = used + available
    assert g0.memory_used_bytes == 1024 * MIB and g0.memory_total_bytes == 81920 * MIB
    assert g1.memory_used_bytes == 2048 * MIB and g1.memory_total_bytes == 81920 * MIB


def test_a_node_whose_agent_has_not_exported_yet_is_listed_incomplete() -> None:
    r = reading_from(parse_node_metrics("# nothing yet\n"), NodeReading(node_id="n", ip="h", metrics_url="-"))
    assert not r.complete and r.cpu_percent is None and r.gpus == []


def test_targets_are_the_alive_nodes_with_a_metrics_port() -> None:
    nodes = [_node("a", 1, head=True), _node("b", 2), _node("dead", 3, alive=False), _node("starting", None)]
    found = targets(nodes)
    assert [(t.node_id, t.is_head, t.metrics_url) for t in found] == [
        ("a", True, "http://127.0.0.1:1/metrics"),
        ("b", False, "http://127.0.0.1:2/metrics"),
    ]


def test_read_nodes_scrapes_every_node_and_reports_an_unreachable_one(exporter: int) -> None:
    from fabric.runtime import free_port

    closed = free_port()  # nothing listens there
    readings = {r.node_id: r for r in read_nodes([_node("up", exporter, head=True), _node("gone", closed)], 2.0)}
    assert readings["up"].complete and readings["up"].error is None and readings["up"].cpu_percent == 37.5
    assert not readings["gone"].complete
    assert readings["gone"].error and f"127.0.0.1:{closed}" in readings["gone"].error
    assert read_nodes([]) == []
