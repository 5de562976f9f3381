"""`fabric serve` on its own local Ray (the fast path): what listens where, and what each way of stopping it leaves.

Each test starts `fabric serve` as a user does (a subprocess in its own session, a tiny model, free ports) and
reads the processes and sockets from the system (psutil). Stopping paths covered here: Ctrl-C, a killed driver
followed by `ray stop`, and Serve's shutdown; `fabric down` of a head serving the app is in
tests/integration/test_cli_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fabric import runtime
from fabric.serve.spec import DIRECT_INGRESS_RANGE_VARS, SIDE_PORT_VARS
from tests.conftest import ROOT
from tests.unit.serve.models import make_model

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("stop-model") / "model", seed=5)


class Served:
    """A running `fabric serve` and what it started."""

    def __init__(self, model: Path, home: Path, port: int, **env_vars: str) -> None:
        self.port = port
        env = {**os.environ, "FABRIC_HOME": str(home), "PYTHONUNBUFFERED": "1", **env_vars}
        for var in ("RAY_ADDRESS", *SIDE_PORT_VARS):
            env.pop(var, None)
        self.log = home / "serve.log"
        args = [
            f"serve.port={port}", f"serve.model_uri={model}", "serve.model_name=tiny", "monitor.enabled=false",
            "serve.replica_cpus=0", "cluster.num_cpus=2", f"run_dir={home / 'runs'}",
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fabric.cli", "serve", *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self) -> None:
        """Until the app answers ready and `fabric serve` says it serves: the app can answer through HAProxy while
        the command still waits for Serve to report it running, and a stop then is a failed start (exit 1)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"fabric serve exited {self.proc.returncode}:\n{self.tail()}"
            try:
                ready = httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready and "serving; Ctrl-C stops" in self.log.read_text():
                return
            time.sleep(1)
        pytest.fail(f"not serving after {START_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def processes(self) -> list[psutil.Process]:
        """The driver and every process under it: its local Ray, Serve's actors, HAProxy."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def settled(self) -> tuple[list[psutil.Process], list[tuple[str, int, str]]]:
        """The processes and their listeners once HAProxy holds its three ports (ingress, stats page, Prometheus
        exporter): it reloads (a new process takes over from the old) as routes come and go, so the HAProxy
        processes of the snapshot must still be running a moment later (CI saw one replaced in between)."""
        deadline = time.monotonic() + 60
        while True:
            procs = self.processes()
            listening = runtime.listeners(procs)
            ha_ports = {port for _, port, label in listening if label.startswith("haproxy")}
            haproxies = _haproxies(procs)
            if self.port in ha_ports and len(ha_ports) >= 3 and haproxies:
                time.sleep(1.0)
                if all(p.is_running() for p in haproxies):
                    return procs, listening
            if time.monotonic() > deadline:
                return procs, listening
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _haproxies(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and runtime.process_label(p).startswith("haproxy")]


def _listening_on(ports: set[tuple[str, int]]) -> list[tuple[str, int, int | None]]:
    found = ((c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, c.pid) for c in psutil.net_connections("inet")
             if c.status == psutil.CONN_LISTEN)  # fmt: skip
    return [(ip, port, pid) for ip, port, pid in found if (ip, port) in ports]


def _held_since(ports: set[tuple[str, int]], stopped_at: float) -> list[tuple[str, int, int | None]]:
    """Listeners on ``ports`` of processes that existed before the stop: a process started afterwards (another
    test's Ray on the other pytest-xdist worker, Ray's default agent port 52365) took a freed port, not a left one."""
    held = []
    for ip, port, pid in _listening_on(ports):
        try:
            if pid is None or psutil.Process(pid).create_time() < stopped_at:
                held.append((ip, port, pid))
        except psutil.NoSuchProcess:
            continue
    return held


def _assert_nothing_left(
    haproxies: list[psutil.Process], ports: set[tuple[str, int]], what: str, stopped_at: float
) -> None:
    _, alive = psutil.wait_procs(haproxies, timeout=30)
    assert not alive, f"HAProxy outlived {what}: {[p.pid for p in alive]}"
    deadline = time.monotonic() + 30
    while _held_since(ports, stopped_at) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _held_since(ports, stopped_at), f"ports still held after {what}: {_held_since(ports, stopped_at)}"


@pytest.fixture
def served(model: Path, tmp_path: Path) -> Iterator[Served]:
    s = Served(model, tmp_path, runtime.free_port())
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_every_listener_is_on_loopback_and_ctrl_c_leaves_nothing(served: Served) -> None:
    procs, listening = served.settled()
    beyond = [entry for entry in listening if entry[0] not in runtime.LOOPBACK_IPS]
    assert not beyond, f"serve.host is 127.0.0.1, yet these listen beyond loopback: {beyond}"
    haproxies = _haproxies(procs)
    ha_ports = {port for _, port, label in listening if label.startswith("haproxy")}
    assert haproxies and served.port in ha_ports and len(ha_ports) >= 3, listening  # ingress, stats, metrics
    # The replica's direct-ingress port (HAProxy forwards there) is in the range `fabric serve` took for its Serve.
    controller = next(p for p in procs if runtime.process_label(p).startswith("ServeController"))
    low, high = (int(controller.environ()[var]) for var in DIRECT_INGRESS_RANGE_VARS)  # it allocates the ports
    replica_ports = {port for _, port, label in listening if label.startswith("ServeReplica")}
    assert any(low <= port <= high for port in replica_ports), (low, high, listening)
    # The fallback proxy (HAProxy's backup while no replica is up) listens on the port its Serve was given, not
    # Ray's fixed 8500, where another Serve's proxy would answer with its own app.
    fallback = int(controller.environ()["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])
    assert fallback != 8500 and (fallback, "ProxyActor") in {(port, label) for _, port, label in listening}, listening
    ports = {(ip, port) for ip, port, _ in listening}  # an address and port: another Ray may hold the port elsewhere

    stopped_at = time.time()
    os.killpg(served.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    assert served.proc.wait(timeout=120) == 0, served.tail()
    _assert_nothing_left(haproxies, ports, "Ctrl-C", stopped_at)


def test_a_killed_driver_then_ray_stop_leaves_no_haproxy(served: Served) -> None:
    procs, listening = served.settled()
    haproxies = _haproxies(procs)
    ports = {(ip, port) for ip, port, label in listening if label.startswith("haproxy")}
    assert haproxies and len(ports) >= 3, listening
    stopped_at = time.time()
    served.proc.kill()
    served.proc.wait(timeout=30)
    # `ray stop`, for this Ray only (others run on this machine): Ray's processes, and not HAProxy, which
    # `ray stop` does not know about.
    runtime.stop_processes([p for p in procs[1:] if p not in haproxies and p.is_running()])
    _assert_nothing_left(haproxies, ports, "a killed driver and `ray stop`", stopped_at)


def test_serve_shutdown_leaves_no_haproxy(served: Served, tmp_path: Path) -> None:
    import ray
    from ray import serve

    procs, listening = served.settled()
    haproxies = _haproxies(procs)
    ports = {(ip, port) for ip, port, label in listening if label.startswith("haproxy")}
    assert haproxies and len(ports) >= 3, listening
    os.environ["FABRIC_HOME"] = str(tmp_path)  # where `fabric serve` recorded its Ray
    stopped_at = time.time()
    try:
        from fabric.serve.control import attach

        attach()
        serve.shutdown()
    finally:
        ray.shutdown()
        os.environ.pop("FABRIC_HOME")
    _assert_nothing_left(haproxies, ports, "serve.shutdown()", stopped_at)
    code = served.proc.wait(timeout=60)
    assert code == 0 and "is gone; exiting" in served.tail(), f"exited {code}:\n{served.tail()}"


def test_a_held_port_is_named_with_its_holder(model: Path, tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ray_tmp = Path(tempfile.mkdtemp(prefix="fabric-held-"))  # short: Ray's socket paths live under it
        s = Served(model, tmp_path, port, RAY_TMPDIR=str(ray_tmp))
        try:
            assert s.proc.wait(timeout=180) == 2, s.tail()
        finally:
            s.stop()
    out = s.tail()
    assert f"serve.port: port {port} on 127.0.0.1 is held by process {os.getpid()}" in out, out
    assert "Traceback" not in out and "HAProxy crashed" not in out
    started = list(ray_tmp.iterdir())
    shutil.rmtree(ray_tmp)
    assert not started, "the port is checked before a local Ray starts"
