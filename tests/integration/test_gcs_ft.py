"""Head-node fault tolerance: the GCS of a `fabric up --redis` head is killed while the tabular app serves.

A real Redis (Debian's ``redis-server``, on a free loopback port in a temp dir) holds the GCS's state; `fabric up
--redis` starts the head with Ray's GCS fault tolerance and fabric's supervisor, which starts a dead GCS again
with its command line (KubeRay restarts the head container instead). Under a bounded load from a thread, the
test SIGKILLs ``gcs_server`` and then only watches: the replicas keep answering (failed requests counted),
a new GCS comes back by itself, Serve lists the app RUNNING and the drift monitor is the same actor with its
window intact. ``-s`` prints ``GCS_FT failed=… of … gcs_back_s=… serve_back_s=…``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from fabric import runtime
from fabric.config import load_config
from fabric.runtime import head_process
from tests.conftest import ROOT
from tests.unit.serve.models import RAW_COLUMNS, make_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MODEL = "tiny"
MONITOR = "test-gcs-ft-monitor"
ROWS = [{"age": 30.0, "income": 70.0, "city": "oslo"}, {"age": 55.0, "income": 20.0, "city": "paris"}]
MAX_REQUESTS = 5000  # the load's bound, whatever happens


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of its own on 127.0.0.1, in memory only, stopped at the end."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip(f"needs Redis's server for the GCS's external store: no {REDIS_SERVER} (`make install` adds it)")
    import redis

    folder = tmp_path_factory.mktemp("redis")
    port = runtime.free_port()
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    proc = subprocess.Popen([*cmd, "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        _wait(lambda: proc.poll() is None and _pings(client), 30, "redis-server to answer")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # redis.ConnectionError while it starts
        return False


def _fabric(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabric.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Head:
    gcs: str
    temp_dir: str
    home: Path
    up_stdout: str
    env: dict[str, str] = field(repr=False)


@pytest.fixture(scope="module")
def head(redis_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """`fabric up --redis` (a development head on loopback), this process connected to it; `fabric down` after."""
    import ray

    home = tmp_path_factory.mktemp("gcs-ft-home")
    env = {**os.environ, "FABRIC_HOME": str(home), "RAY_AUTH_MODE": "token"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    saved = {k: os.environ.get(k) for k in ("FABRIC_HOME", "RAY_ADDRESS")}
    if ray.is_initialized():
        ray.shutdown()
    port, dash = runtime.free_port(), runtime.free_port()
    up = _fabric(env, "up", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2", f"--redis={redis_address}")
    record = json.loads((home / "head.json").read_text()) if (home / "head.json").is_file() else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        os.environ["FABRIC_HOME"] = str(home)
        os.environ.pop("RAY_ADDRESS", None)
        runtime.use_token_auth()
        with runtime.loopback_ray():
            ray.init(address=record["gcs_address"], log_to_driver=False)
        yield Head(record["gcs_address"], record["temp_dir"], home, up.stdout, env)
    finally:
        ray.shutdown()
        down = _fabric(env, "down", timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert down.returncode == 0, down.stdout + down.stderr
        if record:
            assert runtime.head_processes(record["temp_dir"], int(record["gcs_address"].rpartition(":")[2])) == []


@pytest.fixture(scope="module")
def served(head: Head, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tabular app, with the drift monitor on, deployed on the head."""
    from fabric.monitor import start
    from fabric.serve import deploy

    root = tmp_path_factory.mktemp("gcs-ft")
    folder = make_model(root / "model", seed=0)
    ref = pd.DataFrame([{**ROWS[i % 2], "age": 20.0 + i % 40} for i in range(200)])
    ref["target"] = (ref["income"] > 60).astype(int)
    cfg = load_config(
        None,
        [
            f"run_dir={root / 'runs'}",
            f"cluster.address={head.gcs}",
            f"serve.port={runtime.free_port()}",
            f"serve.model_name={MODEL}",
            f"serve.model_uri={folder}",
            "serve.replica_cpus=0",
            "monitor.enabled=true",
            f"monitor.actor_name={MONITOR}",
            "monitor.detached=true",
            "monitor.window_size=100000",  # every row served stays in the window: its count is the state to keep
            "monitor.interval_s=3600",
        ],
    )
    monitor = start(cfg.monitor, ref, target="target", features=RAW_COLUMNS, categorical=["city"])
    result = deploy(cfg, timeout_s=240)
    return {"url": result.url, "monitor": monitor, "cfg": cfg}


class Load(threading.Thread):
    """Requests one after another (a few dozen a second at most, MAX_REQUESTS in all) until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.results: list[tuple[float, bool]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set() and len(self.results) < MAX_REQUESTS:
                try:
                    r = client.post(f"/v2/models/{MODEL}/infer", json={"instances": ROWS})
                    ok = r.status_code == 200
                    if not ok:
                        self.errors.append(f"{r.status_code} {r.text[:300]}")
                except httpx.HTTPError as e:
                    ok = False
                    self.errors.append(f"{type(e).__name__}: {e}")
                self.results.append((time.monotonic(), ok))
                time.sleep(0.02)

    def count(self, since: float = 0.0) -> tuple[int, int]:
        """(requests, failed) sent since ``since``."""
        done = [ok for t, ok in list(self.results) if t >= since]
        return len(done), done.count(False)


def _gcs_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _serve_running() -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get("fabric")
    except Exception:  # the controller or the GCS is not back yet
        return False
    return app is not None and app.status == "RUNNING"


def _stats(monitor: Any) -> dict[str, Any]:
    import ray

    return ray.get(monitor.stats.remote(), timeout=30)


def test_the_head_says_fault_tolerance_is_on(head: Head) -> None:
    assert "gcs fault tol.   on: state in Redis 127.0.0.1:" in head.up_stdout, head.up_stdout
    assert head_process(head.temp_dir, "gcs_server") is not None


def test_replicas_answer_while_the_gcs_is_killed_and_everything_comes_back(head: Head, served: dict[str, Any]) -> None:
    load = Load(served["url"])
    load.start()
    try:
        _wait(lambda: load.count()[0] >= 20, 60, "the load to start")
        before = _stats(served["monitor"])
        assert before["window_size"] > 0
        gcs = head_process(head.temp_dir, "gcs_server")
        assert gcs is not None
        killed_at = time.monotonic()
        gcs.kill()
        gcs.wait(timeout=30)
        # a new GCS process, started by the supervisor (nothing here starts it), then answering on its port
        restarted = _wait(lambda: head_process(head.temp_dir, "gcs_server"), 120, "a new gcs_server")
        assert restarted.pid != gcs.pid
        _wait(lambda: _gcs_answers(head.gcs), 120, "the GCS port to answer")
        gcs_back_s = time.monotonic() - killed_at
        _wait(_serve_running, 180, "Serve to list the app RUNNING")
        serve_back_s = time.monotonic() - killed_at
        resumed_at = time.monotonic()
        _wait(lambda: load.count(resumed_at)[0] >= 20, 60, "requests after the recovery")
    finally:
        load.stop.set()
        load.join(timeout=30)
    sent, failed = load.count()
    during, failed_during = load.count(killed_at)
    print(f"GCS_FT failed={failed} of {sent} (after the kill: {failed_during} of {during}) "
          f"gcs_back_s={gcs_back_s:.1f} serve_back_s={serve_back_s:.1f}")  # fmt: skip
    assert failed == 0, f"{failed} of {sent} failed ({failed_during} of {during} after the kill): {load.errors}"
    # the same monitor actor (not a restarted one), its window kept and still fed (it batches: a moment later)
    after = _wait(
        lambda: (s := _stats(served["monitor"]))["window_size"] >= before["window_size"] + 20 and s, 60, "the window"
    )
    assert after["pid"] == before["pid"] and not after["restored"]
    from fabric.serve import status

    (row,) = status("fabric")
    assert row["status"] == "RUNNING" and row["deployments"]["TabularModel"]["replicas"] == {"RUNNING": 1}
