"""A real two-node Ray cluster on this machine: a head from `fabric up` and a worker from `ray start --address`.

Where this process may make network namespaces (root, iproute2), the worker runs in a namespace of its
own, joined to the host by a veth pair with private 10.x addresses, so every byte between the nodes
crosses an interface; elsewhere the worker listens on 127.0.0.2 beside the head on 127.0.0.1. The line
``TWO_NODE_MODE=...`` in the output (``-s``) says which one ran. Each node declares its own
resources (one CPU and a ``head_node``/``worker_node`` marker), so one worker, block or replica per CPU
must land on each node.

No shared disk: the run's files live in a bucket (moto's S3 server on the head's address, reached the standard
way, AWS_ENDPOINT_URL and keys), and where this process may make mount namespaces the worker node runs in one
of its own in which the test's temporary folders (the head's run folders, FABRIC_HOME, local copies) are an
empty tmpfs. Each node keeps its local copies in a cache folder of its own.

Shown: both nodes alive with their resources; the worker node cannot see the head's files; Ray Data read tasks
on both, reading the bucket; the training stage's two DDP workers one per node, run_dir in the bucket; a Serve
app with a replica per node serving a model folder from the bucket, requests answered by both (matched by
request id in each node's replica access log). Every process and the namespaces are removed at the end,
whatever failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fabric import runtime
from fabric.config import PipelineConfig, load_config
from tests.conftest import ROOT, which_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORE_BYTES = 150 * 1024 * 1024
BUCKET = "two-node"


@dataclass
class Cluster:
    mode: str  # "netns" or "loopback"
    head_ip: str
    worker_ip: str
    gcs: str
    dashboard: str
    home: Path
    worker_temp: str
    up_stdout: str
    hidden: Path | None  # the head's folder the worker node cannot see (None: no mount namespace here)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class _Netns:
    """A network namespace joined to the host by a veth pair; removed by ``close`` (idempotent)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.name = f"fabric-t{tag}"
        self.host_if, self.ns_if = f"fbh{tag}", f"fbn{tag}"
        octet = 16 + tag % 200
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def open(self) -> None:
        _sh("ip", "netns", "add", self.name)
        _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _sh("ip", "link", "set", self.ns_if, "netns", self.name)
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _sh("ip", "link", "set", self.host_if, "up")
        for args in (("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if), ("link", "set", self.ns_if, "up")):
            _sh("ip", "netns", "exec", self.name, "ip", *args)
        _sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def _netns_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and sys.platform == "linux"


def _private_disk(hidden: Path) -> list[str]:
    """A command prefix that runs the rest in a mount namespace of its own in which ``hidden`` is an empty
    tmpfs (the raylet and every process it starts stay in it); [] where this process cannot make one."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or sys.platform != "linux":
        return []
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return []
    script = 'mount -t tmpfs fabric-hidden "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hidden)]


@pytest.fixture(scope="module")
def bucket_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The AWS variables every node gets (the endpoint is filled in by ``cluster`` once it knows the head's
    address); this process's environment has them while the module runs."""
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*keys, "AWS_ENDPOINT_URL", "FABRIC_CACHE_DIR")}
    os.environ.update(keys)
    os.environ["FABRIC_CACHE_DIR"] = str(tmp_path_factory.mktemp("head-cache"))
    try:
        yield keys
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fabric(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabric.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, bucket_env: dict[str, str]) -> Iterator[Cluster]:
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    home = tmp_path_factory.mktemp("two-node-home")
    env = {**os.environ, "FABRIC_HOME": str(home), "RAY_AUTH_MODE": "token"}
    # Serve's fast path buffers 1,000 access-log lines per replica; the test reads them after a few dozen.
    env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    netns = _Netns()
    mode = "loopback"
    if _netns_possible():
        try:
            netns.open()
            mode = "netns"
        except (subprocess.CalledProcessError, OSError):
            netns.close()
    head_ip, worker_ip = (netns.host_ip, netns.ns_ip) if mode == "netns" else ("127.0.0.1", "127.0.0.2")
    worker_temp = f"/tmp/fabric-w{os.getpid()}"
    hidden = tmp_path_factory.getbasetemp()
    private = _private_disk(hidden)
    print(f"TWO_NODE_MODE={mode} head={head_ip} worker={worker_ip} private_disk={bool(private)}")
    s3 = ThreadedMotoServer(ip_address=head_ip, port=0, verbose=False)
    s3.start()
    os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"] = f"http://{head_ip}:{s3.get_host_and_port()[1]}"
    env.update(bucket_env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    gcs_port, dash_port = runtime.free_port(), runtime.free_port()
    if ray.is_initialized():
        ray.shutdown()
    # Gloo (CPU DDP) binds to the address this host's name resolves to, a loopback one here, which the other
    # node cannot reach: name each node's interface, as on any multi-node cluster whose hostnames do that.
    head_if, worker_if = (netns.host_if, netns.ns_if) if mode == "netns" else ("lo", "lo")
    try:
        up = _fabric(
            {**env, "GLOO_SOCKET_IFNAME": head_if},
            "up",
            f"--port={gcs_port}",
            f"--dashboard-port={dash_port}",
            f"--node-ip={head_ip}",
            "--num-cpus=1",
            '--resources={"head_node": 1}',
            f"--object-store-memory={STORE_BYTES}",
        )
        assert up.returncode == 0, up.stdout + up.stderr
        gcs = f"{head_ip}:{gcs_port}"
        join = [
            which_ray(), "start", f"--address={gcs}", f"--node-ip-address={worker_ip}", "--num-cpus=1",
            '--resources={"worker_node": 1}', f"--object-store-memory={STORE_BYTES}", f"--temp-dir={worker_temp}",
            f"--dashboard-agent-listen-port={runtime.free_port()}", "--disable-usage-stats",
        ]  # fmt: skip
        join = [*private, *join]
        if mode == "netns":
            join = ["ip", "netns", "exec", netns.name, *join]
        path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # the worker node's local copies of bucket files: a cache folder of its own
        cache = f"{worker_temp}/cache"
        worker_env = {**env, "PATH": path, "GLOO_SOCKET_IFNAME": worker_if, "FABRIC_CACHE_DIR": cache}
        worker = subprocess.run(join, env=worker_env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
        runtime.use_token_auth()
        ray.init(address=gcs, log_to_driver=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the worker node never joined"
            time.sleep(0.5)
        dashboard = f"http://127.0.0.1:{dash_port}"
        yield Cluster(
            mode, head_ip, worker_ip, gcs, dashboard, home, worker_temp, up.stdout, hidden if private else None
        )
    finally:
        ray.shutdown()
        for _ in range(3):  # workers can fork while their parents stop
            if procs := runtime.head_processes(worker_temp):
                runtime.stop_processes(procs)
        _fabric(env, "down", timeout=120)
        shutil.rmtree(worker_temp, ignore_errors=True)
        s3.stop()
        if mode == "netns":
            netns.close()


def _node_ips() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def test_two_nodes_with_their_own_resources(cluster: Cluster) -> None:
    import ray

    nodes = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert set(nodes) == {cluster.head_ip, cluster.worker_ip}
    assert nodes[cluster.head_ip]["CPU"] == 1 and nodes[cluster.head_ip]["head_node"] == 1
    assert nodes[cluster.worker_ip]["CPU"] == 1 and nodes[cluster.worker_ip]["worker_node"] == 1
    assert "worker_node" not in nodes[cluster.head_ip] and "head_node" not in nodes[cluster.worker_ip]
    # `fabric up` said how to join, and put Serve's fast path in the head's environment
    assert f"ray start --address={cluster.gcs}" in cluster.up_stdout
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in cluster.up_stdout
    if cluster.mode == "netns":
        # the worker's address lives only inside its namespace: traffic to it crosses the veth pair
        assert cluster.worker_ip not in runtime.local_addresses()


def test_the_worker_node_does_not_see_the_heads_disk(cluster: Cluster) -> None:
    import ray

    if cluster.hidden is None:
        pytest.skip("no mount namespace here: the two nodes share this machine's disk")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).exists() and any(Path(path).iterdir())

    on = {n: {"resources": {f"{n}_node": 0.01}} for n in ("head", "worker")}
    home = str(cluster.home)
    assert ray.get(sees.options(**on["head"]).remote(home)) is True
    assert ray.get(sees.options(**on["worker"]).remote(home)) is False


def test_data_blocks_are_read_on_both_nodes(cluster: Cluster) -> None:
    import pandas as pd
    import pyarrow.parquet as pq
    import ray

    from fabric import storage
    from fabric.data import read_split

    data = f"s3://{BUCKET}/blocks/data"
    filesys, root = storage.filesystem(data)
    for i in range(8):
        frame = pd.DataFrame({"x0": np.arange(i * 50, (i + 1) * 50, dtype=np.float32), "label": i % 2})
        pq.write_table(pa_table(frame), f"{root}/train/part-{i:05d}.parquet", filesystem=filesys)

    def tag(batch: pd.DataFrame) -> pd.DataFrame:
        import ray

        return batch.assign(node=ray.get_runtime_context().get_node_id())

    rows = read_split(data, "train").map_batches(tag, batch_format="pandas").to_pandas()
    assert len(rows) == 400 and sorted(rows["x0"]) == list(range(400))
    per_node = Counter(_node_ips()[n] for n in rows["node"])
    assert set(per_node) == {cluster.head_ip, cluster.worker_ip}, per_node
    assert ray.cluster_resources()["CPU"] == 2


def pa_table(frame: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def test_training_workers_run_one_on_each_node(cluster: Cluster) -> None:
    from ray.util.state import list_actors

    from fabric import storage
    from fabric.train import run
    from tests.unit.train.synthetic import write_synthetic

    run_dir = f"s3://{BUCKET}/train-run"
    write_synthetic(storage.local_root(run_dir))  # an ingestion output, published to the bucket as ingest does
    storage.publish(run_dir, "data", last="meta.json")
    cfg = PipelineConfig.model_validate(
        {
            "name": "two-node",
            "run_dir": run_dir,
            "cluster": {"address": cluster.gcs},
            "train": {"epochs": 2, "num_workers": 2, "batch_size": 32, "lr": 0.05, "dropout": 0.0, "max_failures": 0},
        }
    )
    result = run(cfg)
    assert result.metrics["world_size"] == 2 and result.metrics["epoch"] == 2
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    actors = list_actors(address=cluster.dashboard, limit=1000, detail=True)
    workers = [a for a in actors if a.class_name.endswith("TrainWorker")]
    hosts = Counter(_node_ip(a.node_id) for a in workers)
    assert set(hosts) == {cluster.head_ip, cluster.worker_ip} and hosts[cluster.head_ip] == hosts[cluster.worker_ip]
    # the workers' checkpoints went to the bucket (no node's disk holds the run)
    from fabric.train._trainer import run_name, train_key, train_storage

    run_path = storage.join(train_storage(cfg), run_name(cfg, train_key(cfg)))
    assert run_path.startswith(f"s3://{BUCKET}/") and storage.exists(f"{run_path}/checkpoint_manager_snapshot.json")


def _node_ip(node_id: str) -> str:
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}[node_id]


def _replica_logs(temp_dir: str) -> str:
    logs = Path(temp_dir, "session_latest", "logs", "serve").glob("replica_*TabularModel*.log")
    return "".join(p.read_text(errors="replace") for p in logs)


def test_serve_replicas_on_both_nodes_both_answer(cluster: Cluster) -> None:
    from ray import serve

    from fabric import storage
    from fabric.serve import deploy
    from tests.unit.serve.models import FEATURES, make_model, tensor_request

    run_dir = f"s3://{BUCKET}/serve-run"
    make_model(storage.local_root(run_dir) / "model")  # a model folder in the bucket: each replica downloads it
    storage.publish(run_dir, "model")
    model = storage.join(run_dir, "model")
    port = runtime.free_port()
    if cluster.mode == "loopback":
        # Both nodes share one loopback here: a proxy per node would fight over the same port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "0.0.0.0", "port": port})
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"cluster.address={cluster.gcs}",
            f"serve.port={port}",
            # Each node's ingress forwards to replicas on the other node's address; a replica listening on
            # 127.0.0.1 (the single-machine default) is unreachable from there.
            "serve.host=0.0.0.0",
            f"serve.model_uri={model}",
            "serve.model_name=tiny",
            "serve.num_replicas=2",
            "serve.replica_cpus=1",  # one CPU per node: one replica per node
            "serve.access_log=true",  # each replica logs the request ids it answered
            "monitor.enabled=false",
        ],
    )
    result = deploy(cfg, timeout_s=240)
    assert result.url == f"http://0.0.0.0:{port}"
    replicas = [a for a in _serve_actors(cluster.dashboard) if "TabularModel" in a["name"]]
    assert sorted(_node_ip(a["node_id"]) for a in replicas) == sorted([cluster.head_ip, cluster.worker_ip])

    body = tensor_request(np.ones((1, len(FEATURES)), np.float32))
    head_temp = json.loads((cluster.home / "head.json").read_text())["temp_dir"]
    logs = {cluster.head_ip: head_temp, cluster.worker_ip: cluster.worker_temp}
    sent: list[str] = []
    answered: dict[str, set[str]] = {}
    # The ingress health-checks a new replica a few times before it routes to it: send rounds of
    # concurrent requests (bounded) until both nodes' replicas have logged answering some.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, ThreadPoolExecutor(8) as pool:
        for round_ in range(30):
            # fixed width, so that no id is a substring of another
            ids = [f"two-node-{os.getpid()}-{round_:02d}-{i:02d}" for i in range(16)]
            statuses = list(pool.map(lambda rid: _infer(client, body, rid), ids))
            assert statuses == [200] * len(ids), statuses
            sent += ids
            answered = _answered_by(logs, sent)
            if all(answered.values()):
                break
            time.sleep(1)
    deadline = time.monotonic() + 30
    while sum(map(len, answered.values())) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.5)  # log lines reach their files a little after the responses
        answered = _answered_by(logs, sent)
    counts = {ip: len(ids) for ip, ids in answered.items()}
    assert answered[cluster.head_ip].isdisjoint(answered[cluster.worker_ip])
    assert sum(counts.values()) == len(sent), counts  # every request answered by exactly one node
    assert counts[cluster.head_ip] > 0 and counts[cluster.worker_ip] > 0, counts


def _infer(client: httpx.Client, body: dict[str, Any], request_id: str) -> int:
    r = client.post("/v2/models/tiny/infer", json=body, headers={"x-request-id": request_id})
    return r.status_code


def _answered_by(logs: dict[str, str], ids: list[str]) -> dict[str, set[str]]:
    """Node IP -> the request ids its replica's access log records."""
    out = {}
    for ip, temp_dir in logs.items():
        text = _replica_logs(temp_dir)
        out[ip] = {rid for rid in ids if rid in text}
    return out


def _serve_actors(dashboard: str) -> list[dict[str, Any]]:
    from ray.util.state import list_actors

    return [
        {"name": a.name or "", "node_id": a.node_id}
        for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
        if a.ray_namespace == "serve"
    ]
