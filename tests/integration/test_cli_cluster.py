"""`fabric up` → plain `ray job submit` → `fabric submit` → `fabric status` → `fabric down`, on a real head.

The head gets its own ports and FABRIC_HOME so it never touches another Ray on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fabric import runtime
from tests.conftest import ROOT, which_ray

pytestmark = pytest.mark.integration

GCS_PORT = 6479
DASH_PORT = 8365
TEMP_DIR = f"/tmp/fabric-{os.getuid()}-{GCS_PORT}"
URL = f"http://127.0.0.1:{DASH_PORT}"
SMOKE = "jobs/configs/pipeline_smoke.yaml"


def fabric(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabric.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def our_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info.get("cmdline") or [])):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("fabric-home")
    env = {**os.environ, "FABRIC_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    # Ray's default client server port is held by another process (here, this one): the head takes another.
    with socket.socket() as other:
        try:
            other.bind(("127.0.0.1", runtime.DEFAULT_CLIENT_PORT))
            other.listen()
        except OSError:
            pass  # already held by some other process: the same case
        up = fabric(env, "up", f"--port={GCS_PORT}", f"--dashboard-port={DASH_PORT}", "--num-cpus=2")
    assert up.returncode == 0, up.stdout + up.stderr
    env["UP_STDOUT"] = up.stdout
    yield env
    fabric(env, "down")


def test_up_prints_addresses_token_and_next_steps(head: dict[str, str]) -> None:
    out = head["UP_STDOUT"]
    assert "Ray head started." in out
    assert f"dashboard        {URL}" in out
    assert f"ray address      127.0.0.1:{GCS_PORT}" in out
    assert "auth token" in out and "RAY_AUTH_MODE=token" in out
    assert "fabric submit jobs/" in out
    assert "also export\n  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in out  # how plain Ray clients reach this GCS


def _head_listeners() -> list[tuple[str, int, str]]:
    return runtime.listeners(runtime.head_processes(TEMP_DIR, GCS_PORT))


def test_every_port_of_a_development_head_is_on_loopback_as_printed(head: dict[str, str]) -> None:
    listening = _head_listeners()
    labels = {label for _, _, label in listening}
    assert {"gcs_server", "raylet", "dashboard", "ray-client-server"} <= labels, listening
    assert [e for e in listening if e[0] not in runtime.LOOPBACK_IPS] == []
    printed = head["UP_STDOUT"]
    assert f"{GCS_PORT} gcs_server" in printed and f"{DASH_PORT} dashboard" in printed
    client_port = next(port for _, port, label in listening if label == "ray-client-server")
    assert client_port != runtime.DEFAULT_CLIENT_PORT
    assert f"ray client       ray://127.0.0.1:{client_port}" in printed and f"{client_port} ray-client-server" in printed
    assert "every port is on loopback" in printed and "reachable from other machines" not in printed


def test_job_api_requires_the_token(head: dict[str, str]) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{URL}/api/jobs/", timeout=10)
    assert info.value.code == 401


def test_up_twice_says_already_up(head: dict[str, str]) -> None:
    again = fabric(head, "up", f"--port={GCS_PORT}", f"--dashboard-port={DASH_PORT}")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout


def test_plain_ray_job_submit_runs_a_jobs_script(head: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "plain"
    env = {**head, "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(
        [which_ray(), "job", "submit", "--address", URL, "--working-dir", ".", "--",
         "python", "jobs/ingest.py", "--config", SMOKE, f"run_dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    assert meta["rows"]["train"] > 0
    assert "train" in proc.stdout  # the job's own summary reached the submitter


def test_fabric_submit_with_override_streams_logs_and_succeeds(head: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "fabric"
    proc = fabric(head, "submit", "jobs/ingest.py", "--config", SMOKE, "data.split.seed=7", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitted raysubmit_" in proc.stdout and "succeeded." in proc.stdout
    assert "data.split.seed=7" in proc.stdout  # the override reached the job's entrypoint
    assert (run_dir / "data" / "meta.json").is_file()


def test_bad_config_exits_2_and_submits_nothing(head: dict[str, str]) -> None:
    before = fabric(head, "jobs", "list").stdout.count("raysubmit_")
    proc = fabric(head, "submit", "jobs/ingest.py", "--config", SMOKE, "train.num_workers=0", "train.bogus=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.strip().startswith("train.num_workers:") for line in lines)
    assert any(line.strip().startswith("train.bogus: unknown key") for line in lines)
    assert "Traceback" not in proc.stderr
    assert fabric(head, "jobs", "list").stdout.count("raysubmit_") == before


def test_oversized_working_dir_is_refused_before_upload(head: dict[str, str]) -> None:
    env = {**head, "RAY_max_grpc_message_size": "2048"}
    proc = fabric(env, "submit", "jobs/ingest.py", "--config", SMOKE)
    assert proc.returncode == 2
    assert "over Ray's upload limit" in proc.stderr and "--exclude" in proc.stderr


def test_status_lists_nodes_resources_and_jobs(head: dict[str, str]) -> None:
    proc = fabric(head, "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ALIVE" in out and "(head)" in out
    assert "CPU" in out and "free of 2.0" in out
    assert "jobs/ingest.py" in out and "SUCCEEDED" in out
    assert "Serve applications" in out


def test_jobs_logs_and_unknown_id(head: dict[str, str]) -> None:
    listing = fabric(head, "jobs", "list").stdout
    job_id = next(w for w in listing.split() if w.startswith("raysubmit_"))
    logs = fabric(head, "jobs", "logs", job_id)
    assert logs.returncode == 0 and "train" in logs.stdout
    missing = fabric(head, "jobs", "logs", "raysubmit_nope")
    assert missing.returncode == 2 and "no job with id" in missing.stderr


def test_serve_on_the_head_listens_on_loopback_only(head: dict[str, str], tmp_path: Path) -> None:
    from tests.unit.serve.models import make_model

    port = runtime.free_port()
    model = make_model(tmp_path / "model", seed=2)
    proc = fabric(
        head, "serve", "--detach", f"serve.port={port}", f"serve.model_uri={model}", "serve.model_name=tiny",
        "monitor.enabled=false", "serve.replica_cpus=0", f"run_dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listening = _head_listeners()
    haproxy = {p for _, p, label in listening if label.startswith("haproxy")}
    assert port in haproxy and len(haproxy) >= 3, listening  # ingress, stats page, Prometheus exporter
    assert [e for e in listening if e[0] not in runtime.LOOPBACK_IPS] == []


def test_down_stops_only_our_head(head: dict[str, str]) -> None:
    import ray

    procs = runtime.head_processes(TEMP_DIR, GCS_PORT)
    assert our_processes(TEMP_DIR), "the head should be running before `fabric down`"
    ports = {port for _, port, _ in runtime.listeners(procs)}
    assert {GCS_PORT, DASH_PORT} <= ports and any(runtime.process_label(p) == "ray-client-server" for p in procs)
    # Another Ray on the same machine (started here, not by `fabric up`) must survive `fabric down`.
    runtime.start_local_ray(num_cpus=1, include_dashboard=False)
    try:
        proc = fabric(head, "down")
        assert proc.returncode == 0 and "Stopped the Ray head" in proc.stdout
        assert our_processes(TEMP_DIR) == []
        assert ray.get(ray.put(41)) == 41 and ray.cluster_resources().get("CPU") == 1.0
    finally:
        ray.shutdown()
    # Every process the head started (its Ray client server and Serve's HAProxy included) is gone, and so is
    # every socket they listened on.
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert alive == [], [(p.pid, runtime.process_label(p)) for p in alive]
    held = [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.pid in {p.pid for p in procs}
    ]
    assert held == [] and not any(
        c.status == psutil.CONN_LISTEN and c.laddr.port in (GCS_PORT, DASH_PORT) for c in psutil.net_connections("inet")
    )
    again = fabric(head, "down")
    assert again.returncode == 0 and "nothing to stop" in again.stdout
