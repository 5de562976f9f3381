"""Per-node resource sampler: CPU and memory (psutil) and GPUs (NVML, when pynvml and a GPU are there).

Readings become Prometheus gauges through ``ray.util.metrics``, tagged by node, so Ray's dashboards and
Grafana show them next to Ray's own metrics. Run it as one small actor per node (``start_samplers``) or
call ``ResourceSampler.sample`` from any Ray process.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger("fabric.monitor")

NAMESPACE = "fabric"
SAMPLER_PREFIX = "fabric-resources-"


class GpuReader:
    """NVML readings of every GPU on this node; ``available`` is False without pynvml or a GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.count = 0
        try:
            import pynvml  # nvidia-ml-py, in the fabric[gpu] extra
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:  # no driver, no GPU
            log.debug("NVML unavailable: %s", e)
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        """True when NVML answered and saw at least one GPU."""
        return self._nvml is not None and self.count > 0

    def read(self) -> list[dict[str, Any]]:
        """One dict per GPU: index, name, uuid, utilization_percent, memory used/total bytes, temperature."""
        if not self.available:
            return []
        nv = self._nvml
        out = []
        for i in range(self.count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                uuid = nv.nvmlDeviceGetUUID(h)
                try:
                    temp: int | None = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                except nv.NVMLError:
                    temp = None
            except nv.NVMLError as e:  # a GPU fell off the bus or is in a bad state: report the others
                log.warning("NVML read of GPU %d failed: %s", i, e)
                continue
            out.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                "utilization_percent": float(util.gpu),
                "memory_used_bytes": int(mem.used),
                "memory_total_bytes": int(mem.total),
                "temperature_c": temp,
            })  # fmt: skip
        return out

    def close(self) -> None:
        """Release NVML."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None


def read_node() -> dict[str, Any]:
    """This node's CPU and memory use now (psutil); ``cpu_percent`` is since the previous call."""
    import psutil

    vm = psutil.virtual_memory()
    return {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "cpu_count": psutil.cpu_count() or 0,
        "memory_used_bytes": int(vm.total - vm.available),
        "memory_total_bytes": int(vm.total),
        "memory_percent": float(vm.percent),
    }


class ResourceSampler:
    """Samples this node and sets the ``fabric_node_*`` gauges (tags: ``node`` id and ``ip``; GPUs: ``gpu``).

    Args:
        node: the Ray node id (default: this process's node).
        ip: the node's address (default: this process's).
        gpu: read GPUs through NVML when available.
    """

    def __init__(self, node: str | None = None, ip: str | None = None, gpu: bool = True) -> None:
        import ray
        from ray.util.metrics import Gauge

        self.node = node or ray.get_runtime_context().get_node_id()
        self.ip = ip or ray.util.get_node_ip_address()
        self.tags = {"node": self.node, "ip": self.ip}
        n = ("node", "ip")
        g = ("node", "ip", "gpu")
        self.cpu = Gauge("fabric_node_cpu_percent", "CPU use of the node, percent of all cores", n)
        self.mem_used = Gauge("fabric_node_memory_used_bytes", "Memory in use on the node", n)
        self.mem_total = Gauge("fabric_node_memory_total_bytes", "Memory of the node", n)
        self.mem_pct = Gauge("fabric_node_memory_percent", "Memory use of the node, percent", n)
        self.gpu_util = Gauge("fabric_node_gpu_utilization_percent", "GPU utilization (NVML), percent", g)
        self.gpu_mem_used = Gauge("fabric_node_gpu_memory_used_bytes", "GPU memory in use (NVML)", g)
        self.gpu_mem_total = Gauge("fabric_node_gpu_memory_total_bytes", "GPU memory (NVML)", g)
        self.gpus = GpuReader() if gpu else None
        read_node()  # psutil's first cpu_percent is meaningless: start its interval now
        self.last: dict[str, Any] | None = None

    def sample(self) -> dict[str, Any]:
        """Read the node (and its GPUs), set the gauges, return the reading."""
        reading = read_node()
        gpus = self.gpus.read() if self.gpus is not None else []
        t = self.tags
        self.cpu.set(reading["cpu_percent"], t)
        self.mem_used.set(reading["memory_used_bytes"], t)
        self.mem_total.set(reading["memory_total_bytes"], t)
        self.mem_pct.set(reading["memory_percent"], t)
        for g in gpus:
            gt = {**t, "gpu": str(g["index"])}
            self.gpu_util.set(g["utilization_percent"], gt)
            self.gpu_mem_used.set(g["memory_used_bytes"], gt)
            self.gpu_mem_total.set(g["memory_total_bytes"], gt)
        self.last = {**reading, "node": self.node, "ip": self.ip, "gpus": gpus}
        return self.last

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Sample every ``interval_s`` until ``stop`` is set (a failed sample is logged, not fatal)."""
        while not stop.wait(interval_s):
            try:
                self.sample()
            except Exception:
                log.exception("resource sample failed")


class ResourceSamplerActor:
    """One per node (pinned with a node-affinity strategy, no CPU reserved): samples in a thread."""

    def __init__(self, interval_s: float) -> None:
        self.sampler = ResourceSampler()
        self.sampler.sample()
        self._stop = threading.Event()
        threading.Thread(target=self.sampler.run, args=(interval_s, self._stop), daemon=True).start()

    def latest(self) -> dict[str, Any] | None:
        """The last reading."""
        return self.sampler.last

    def sample(self) -> dict[str, Any]:
        """Sample now."""
        return self.sampler.sample()


def start_samplers(interval_s: float = 10.0, *, detached: bool = True) -> list[ActorHandle]:
    """Start (or find) a sampler actor on every alive node; returns their handles. Ray must be connected."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(ResourceSamplerActor)
    handles = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        handles.append(
            actor_cls.options(  # type: ignore[attr-defined]
                name=SAMPLER_PREFIX + node_id[:16],
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached" if detached else None,
                num_cpus=0,
                max_restarts=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(interval_s)
        )
    return handles


def stop_samplers() -> int:
    """Kill the sampler actor of every node Ray knows of; returns how many were running."""
    import ray

    count = 0
    for node in ray.nodes():
        try:
            handle = ray.get_actor(SAMPLER_PREFIX + node["NodeID"][:16], namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        count += 1
    return count
