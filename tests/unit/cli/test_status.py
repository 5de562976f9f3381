"""`fabric status`'s node table: host readings from Ray's node metrics, the dashboard's summary where a node's
metrics port did not answer (no Ray)."""

from __future__ import annotations

from fabric.cli.status import GIB, node_rows
from fabric.monitor.resources import GpuReading, NodeReading

SUMMARY = [
    {
        "ip": "10.0.0.1",
        "cpu": 12.0,
        "mem": [16 * GIB, 12 * GIB, 25.0, 4 * GIB],
        "raylet": {"nodeId": "head", "state": "ALIVE", "isHeadNode": True, "resourcesTotal": {"CPU": 4.0}},
    },
    {
        "ip": "10.0.0.2",
        "cpu": 50.0,
        "mem": [32 * GIB, 16 * GIB, 50.0, 16 * GIB],
        "raylet": {"nodeId": "late", "state": "ALIVE", "resourcesTotal": {"CPU": 8.0, "GPU": 1.0}},
    },
]


def test_rows_take_ray_node_metrics_and_fall_back_to_the_summary() -> None:
    readings = {
        "late": NodeReading(
            node_id="late",
            ip="10.0.0.2",
            metrics_url="http://10.0.0.2:8080/metrics",
            cpu_percent=87.0,
            memory_used_bytes=20 * GIB,
            memory_total_bytes=32 * GIB,
            gpus=[GpuReading("0", "L4", 65.0, 3 * GIB, 24 * GIB)],
        ),
        "head": NodeReading(node_id="head", ip="10.0.0.1", metrics_url="-", error="no metrics at ..."),
    }
    header, head, late = node_rows(SUMMARY, None, readings)
    assert header[4:] == ("HOST CPU", "HOST MEM used/total", "GPUS")
    assert late[0] == "10.0.0.2" and late[4:] == ("87%", "20.0/32.0 GiB", "L4 65% 3.0/24.0GiB")
    assert head[0] == "10.0.0.1 (head)" and head[4:] == ("12%", "4.0/16.0 GiB", "-")  # the dashboard's reading
