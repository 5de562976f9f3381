"""The drift-monitor actor on a real local Ray: fed by MonitorClient, back-pressure, restart from checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.config import MonitorConfig, PipelineConfig
from fabric.monitor import MonitorClient, get_actor, start
from tests.unit.monitor._data import N_REF, make_frame, rows_and_preds
from tests.unit.serve.serving import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def monitor(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MonitorConfig, Any, Path]]:
    """One monitor actor for the module (each actor start imports Evidently: seconds)."""
    ckpt = tmp_path_factory.mktemp("monitor") / "state.pkl"
    cfg = MonitorConfig(
        actor_name="test-drift-monitor", window_size=300, interval_s=3600, checkpoint_interval_s=0.5,
        detached=False,
    )  # fmt: skip
    handle = start(cfg, make_frame(N_REF, seed=0), target="target", task="classification", checkpoint_path=ckpt)
    yield cfg, handle, ckpt


def test_client_feeds_the_actor_without_blocking(monitor: tuple[MonitorConfig, Any, Path]) -> None:
    import ray

    cfg, handle, _ = monitor
    client = MonitorClient(cfg)
    rows, preds = rows_and_preds(make_frame(400, seed=3, age_shift=15, city_p=[0.8, 0.1, 0.1]))
    latencies = []
    for i in range(0, 400, 8):
        t = time.perf_counter()
        assert client.submit(rows[i : i + 8], preds[i : i + 8]) == 8
        latencies.append(time.perf_counter() - t)
    assert client.flush(30)
    latencies.sort()
    # a fire-and-forget .remote(): well under a millisecond typically; generous for a loaded 2-core CI box
    assert latencies[len(latencies) // 2] < 0.02, latencies

    stats = ray.get(handle.stats.remote())
    assert stats["received"] == 400 and stats["window_size"] == 300  # bounded

    result = client.drift_json(refresh=True)
    assert result["status"] == "ok" and set(result["drifted_columns"]) == {"age", "city"}
    assert result["drift_detected"] and result["columns"]["age"]["test"] == "ks"
    json.dumps(result, allow_nan=False)
    assert client.drift_json()["computed_at"] == result["computed_at"]  # the last result, not recomputed

    html = client.report_html()
    assert "<html" in html[:1000].lower() and "city" in html and "age" in html


def test_backpressure_drops_and_counts(monitor: tuple[MonitorConfig, Any, Path]) -> None:
    import ray

    cfg, handle, _ = monitor
    before = ray.get(handle.stats.remote())
    client = MonitorClient(cfg, max_in_flight=2)
    rows, preds = rows_and_preds(make_frame(10, seed=1))
    # Keep the actor's threads busy so acknowledgements lag behind a burst of submissions.
    busy = [handle.report_html.remote(True) for _ in range(2)]
    start_t = time.perf_counter()
    sent = [client.submit(rows, preds) for _ in range(300)]
    elapsed = time.perf_counter() - start_t
    assert elapsed < 3.0, f"300 submissions took {elapsed:.2f}s"
    assert client.dropped > 0 and client.dropped % 10 == 0
    assert sum(sent) + client.dropped == 3000
    ray.get(busy)
    assert client.flush(30)
    assert client.submit(rows, preds) == 10  # carries the drop count to the actor
    assert client.flush(30)
    after = ray.get(handle.stats.remote())
    assert after["dropped"] - before["dropped"] == client.dropped
    assert after["received"] - before["received"] == client.sent


def test_killed_actor_restarts_with_its_window_and_reference(monitor: tuple[MonitorConfig, Any, Path]) -> None:
    import ray

    cfg, handle, ckpt = monitor
    before = ray.get(handle.stats.remote())
    window_before = before["window_size"]
    wait_for(
        lambda: ray.get(handle.stats.remote())["checkpointed_received"] == before["received"],
        what="the periodic checkpoint",
    )
    assert ckpt.is_file()

    ray.kill(handle, no_restart=False)  # asynchronous: wait for a new process, not an answer from the old one
    after = wait_for(
        lambda: (s := _stats_if_up(handle)) and s["pid"] != before["pid"] and s, timeout_s=90, what="the restart"
    )
    assert after["restored"] is True
    assert after["window_size"] == window_before
    assert after["received"] == before["received"] and after["dropped"] == before["dropped"]
    assert after["reference_fingerprint"] == before["reference_fingerprint"]
    assert get_actor(cfg.actor_name) is not None  # still found by name

    # the restarted actor keeps working: same verdict on the restored window
    result = ray.get(handle.compute.remote())
    assert result["window_size"] == window_before and result["reference_size"] == N_REF


def test_a_reset_window_stays_empty_across_a_restart(monitor: tuple[MonitorConfig, Any, Path]) -> None:
    import ray

    cfg, handle, _ = monitor
    assert ray.get(handle.stats.remote())["window_size"] > 0
    out = MonitorClient(cfg).reset()
    assert out["reset"] is True and out["rows_dropped"] > 0 and out["monitor"]["window_size"] == 0
    before = ray.get(handle.stats.remote())
    assert before["checkpointed_received"] == before["received"]  # the empty window is checkpointed at once
    ray.kill(handle, no_restart=False)
    after = wait_for(
        lambda: (s := _stats_if_up(handle)) and s["pid"] != before["pid"] and s, timeout_s=90, what="the restart"
    )
    assert after["restored"] is True and after["window_size"] == 0 and after["last_reset_at"] is not None
    assert ray.get(handle.drift.remote())["status"] == "insufficient_data"


def test_detached_monitor_restarts_after_its_creator_exits(ray_local: None, tmp_path: Path) -> None:
    """A driver starts the detached monitor and exits; the restart needs nothing the driver owned.

    (Ray cannot always restart an actor whose constructor argument lived in the object store, ray-project/ray
    #53727, so the reference reaches the actor by a method call and its checkpoint, never as an argument.)
    """
    import subprocess
    import sys

    import ray

    ckpt = tmp_path / "state.pkl"
    root = Path(__file__).resolve().parents[2]
    code = f"""
import ray
from fabric.config import MonitorConfig
from fabric.monitor import start
from tests.unit.monitor._data import make_frame
ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)
cfg = MonitorConfig(actor_name="test-orphan-monitor", detached=True)
# 3000 rows: well over Ray's 100 KiB inline limit, so a constructor argument would live in the object store
start(cfg, make_frame(3000, seed=0), target="target", checkpoint_path={str(ckpt)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180, cwd=root, capture_output=True)
    handle = get_actor("test-orphan-monitor")
    assert handle is not None
    try:
        before = ray.get(handle.stats.remote())
        assert before["reference_size"] == 3000 and ckpt.is_file()
        ray.kill(handle, no_restart=False)
        after = wait_for(
            lambda: (s := _stats_if_up(handle)) and s["pid"] != before["pid"] and s, timeout_s=90, what="the restart"
        )
        assert after["restored"] and after["reference_fingerprint"] == before["reference_fingerprint"]
    finally:
        ray.kill(handle, no_restart=True)


def _stats_if_up(handle: Any) -> dict[str, Any] | None:
    import ray

    try:
        return ray.get(handle.stats.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_run_starts_the_monitor_over_ingestion_outputs(ray_local: None, tmp_path: Path) -> None:
    import ray

    from fabric import monitor as fm

    data = tmp_path / "data"
    data.mkdir()
    make_frame(300, seed=0).to_parquet(data / "reference.parquet")
    (data / "meta.json").write_text(json.dumps({"task": "classification", "target": "target"}))
    cfg = PipelineConfig(run_dir=str(tmp_path), monitor={"actor_name": "test-run-monitor"})
    handle = fm.run(cfg)
    try:
        stats = ray.get(handle.stats.remote())
        assert stats["features"] == ["age", "income", "plan", "city"]
        assert stats["checkpoint_path"] == str((tmp_path / "monitor" / "state.pkl").resolve())
        assert fm.run(cfg)._actor_id == handle._actor_id  # get-or-create by name
        make_frame(300, seed=9).to_parquet(data / "reference.parquet")  # a later run's reference
        assert fm.run(cfg)._actor_id == handle._actor_id
        assert ray.get(handle.stats.remote())["reference_fingerprint"] != stats["reference_fingerprint"]
        (reading,) = fm.read_nodes()  # node resources: Ray's own node metrics, no sampler actor of fabric's
        assert reading.complete and reading.memory_total_bytes > 0, reading
    finally:
        assert fm.stop(cfg)
    wait_for(lambda: get_actor("test-run-monitor") is None, timeout_s=30, what="the monitor to stop")


def test_metrics_reach_prometheus_export(monitor: tuple[MonitorConfig, Any, Path]) -> None:
    import urllib.request

    import ray

    cfg, handle, _ = monitor
    rows, preds = rows_and_preds(make_frame(100, seed=5))
    MonitorClient(cfg).submit(rows, preds)
    client = MonitorClient(cfg, max_in_flight=1)
    for i in range(0, 100, 2):
        client.submit(rows[i : i + 2], preds[i : i + 2])
    assert client.flush(30) and client.dropped > 0
    assert ray.get(handle.compute.remote())["status"] == "ok"
    port = ray._private.worker.global_worker.node.metrics_export_port  # this node's Prometheus endpoint
    wanted = {
        "ray_fabric_monitor_drift_share",
        "ray_fabric_monitor_feature_drift_score",
        "ray_fabric_monitor_window_size",
        "ray_fabric_monitor_received_samples_total",
        "ray_fabric_monitor_dropped_samples_total",
    }

    def scrape() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        names = {line.split("{", 1)[0] for line in text.splitlines() if line.startswith("ray_fabric_")}
        return text if wanted <= names else None

    text = wait_for(scrape, timeout_s=60, what=f"{sorted(wanted)} in Ray's Prometheus export")
    assert 'feature="age"' in text and 'test="ks"' in text and 'reason="backpressure"' in text
