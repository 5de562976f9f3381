"""Resource sampler without Ray: psutil readings, and the NVML path against a stand-in pynvml module."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from fabric.monitor.resources import GpuReader, ResourceSampler, read_node


def _fake_pynvml(count: int = 2, fail_index: int | None = None, init_error: bool = False) -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state: dict[str, Any] = {"init": 0, "shutdown": 0}

    def init() -> None:
        if init_error:
            raise NVMLError("Driver Not Loaded")
        state["init"] += 1

    def handle(i: int) -> int:
        if i == fail_index:
            raise NVMLError("GPU is lost")
        return i

    nv.NVMLError = NVMLError  # type: ignore[attr-defined]
    nv.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nv.nvmlInit = init  # type: ignore[attr-defined]
    nv.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    nv.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    ns = types.SimpleNamespace
    nv.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=40 + h, memory=10)  # type: ignore[attr-defined]
    gib = 2**30
    nv.nvmlDeviceGetMemoryInfo = lambda h: ns(used=(h + 1) * gib, total=80 * gib, free=0)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 50  # type: ignore[attr-defined]
    nv.state = state  # type: ignore[attr-defined]
    return nv


def test_read_node_reports_cpu_and_memory() -> None:
    r = read_node()
    assert 0 <= r["cpu_percent"] <= 100 and r["cpu_count"] >= 1
    assert 0 < r["memory_used_bytes"] <= r["memory_total_bytes"]


def test_gpu_reader_reads_every_gpu_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = _fake_pynvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    reader = GpuReader()
    assert reader.available and reader.count == 2
    gpus = reader.read()
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[1] == {
        "index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "utilization_percent": 41.0,
        "memory_used_bytes": 2 * 2**30, "memory_total_bytes": 80 * 2**30, "temperature_c": 50,
    }  # fmt: skip
    reader.close()
    assert nv.state == {"init": 1, "shutdown": 1} and not reader.available


def test_gpu_reader_skips_a_lost_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=3, fail_index=1))
    assert [g["index"] for g in GpuReader().read()] == [0, 2]


@pytest.mark.parametrize("broken", ["no module", "no driver"])
def test_gpu_reader_without_nvml_reports_nothing(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None if broken == "no module" else _fake_pynvml(init_error=True))
    reader = GpuReader()
    assert not reader.available and reader.read() == []


def test_sampler_sets_gauges_per_node_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=1))
    sampler = ResourceSampler(node="node-1", ip="10.0.0.1")
    seen: list[tuple[str, float, dict[str, str]]] = []
    for attr in ("cpu", "mem_used", "mem_total", "mem_pct", "gpu_util", "gpu_mem_used", "gpu_mem_total"):
        gauge = getattr(sampler, attr)
        monkeypatch.setattr(gauge, "set", lambda v, tags, _n=gauge._name: seen.append((_n, v, tags)))
    reading = sampler.sample()
    assert reading["node"] == "node-1" and len(reading["gpus"]) == 1
    names = {n for n, _, _ in seen}
    assert {"fabric_node_cpu_percent", "fabric_node_memory_used_bytes", "fabric_node_gpu_utilization_percent"} <= names
    gpu_tags = next(t for n, _, t in seen if n == "fabric_node_gpu_utilization_percent")
    assert gpu_tags == {"node": "node-1", "ip": "10.0.0.1", "gpu": "0"}
