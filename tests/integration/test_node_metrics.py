"""Node readings come from Ray's own metrics: a node that joins a running cluster is read like the head, with
nothing of fabric's started on it (``ray.cluster_utils.Cluster``: two raylets on this machine, on loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric import runtime
from fabric.monitor.resources import NodeReading, read_nodes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with runtime.loopback_ray():
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            ray.init(address=c.address, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def _complete(count: int, timeout_s: float = 120.0) -> list[NodeReading]:
    """``read_nodes()`` once it lists ``count`` nodes with CPU and memory readings (an agent exports a moment
    after its node registers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        readings = read_nodes()
        if len(readings) == count and all(r.complete for r in readings):
            return readings
        assert time.monotonic() < deadline, f"no complete readings of {count} nodes: {readings}"
        time.sleep(1)


def test_a_node_that_joins_later_is_read_from_its_own_metrics_port(cluster: Any) -> None:
    import ray

    (head,) = _complete(1)
    assert head.is_head and head.error is None
    joined = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    readings = {r.node_id: r for r in _complete(2)}
    late = readings[joined.node_id]
    assert not late.is_head and late.metrics_url != head.metrics_url
    assert 0 <= late.cpu_percent <= 100  # type: ignore[operator]
    assert 0 < late.memory_used_bytes < late.memory_total_bytes  # type: ignore[operator]
    assert late.gpus == []  # no GPU on this machine
    # nothing of fabric's runs to produce them
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "fabric"]
    assert actors == []
