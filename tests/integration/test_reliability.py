"""Reliability and security of the tabular Serve app on a real local Ray (fast path, 2 replicas, 127.0.0.1).

One deployment for the module, used in this order: every HTTP operation fuzzed from the app's own OpenAPI
document (schemathesis: each answer conforms to it, no 5xx, no hung request), nothing that serves the model
reachable on another interface, then a replica killed under a steady bounded load (the app recovers by itself).

The other failures of the suite are covered next to their stages:
- a Ray Train worker killed mid-run resumes from the last checkpoint and finishes:
  tests/integration/test_train.py::test_a_killed_worker_resumes_from_its_checkpoint;
- the drift-monitor actor killed restarts with its window and reference:
  tests/integration/test_monitor_actor.py::test_killed_actor_restarts_with_its_window_and_reference
  (and ::test_detached_monitor_restarts_after_its_creator_exits);
- malformed configs never reach the cluster (tests/integration/test_cli_cluster.py), malformed data files
  stop ingestion before anything is written (tests/integration/test_ingest.py).
benchmarks/reliability.py prints the figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from fabric import runtime
from fabric.config import load_config
from tests.integration.fuzzing import fuzz
from tests.unit.serve.models import FEATURES, make_model, tensor_request
from tests.unit.serve.serving import local_ray

pytestmark = pytest.mark.integration

MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A local Ray with the fast path's environment and the app deployed with 2 replicas."""
    from fabric.serve import deploy

    root = tmp_path_factory.mktemp("reliability")
    folder = make_model(root / "model")
    with local_ray(root / "home"):  # its end ends Serve (serve.shutdown would wait out each replica's drain)
        port = runtime.free_port()
        cfg = load_config(
            None,
            [
                f"run_dir={root / 'runs'}",
                f"serve.port={port}",
                f"serve.model_uri={folder}",
                f"serve.model_name={MODEL}",
                "serve.num_replicas=2",
                "serve.replica_cpus=0",
                "serve.max_body_bytes=65536",
                "monitor.enabled=false",
            ],
        )
        result = deploy(cfg, timeout_s=240)
        yield {"url": result.url, "port": port, "cfg": cfg}


def test_every_operation_fuzzed_gets_answers_conforming_to_openapi(served: dict[str, Any]) -> None:
    """Valid and invalid requests generated from each operation of the app's own OpenAPI document, each
    answer validated against it (status, content type, body schema)."""
    # requests naming the served model (generated ones do not guess it): their answers are validated too
    named = {"path_parameters": {"name": MODEL}}
    pinned = {"path_parameters": {"name": MODEL, "version": "v1"}}
    rows = np.ones((2, len(FEATURES)), np.float32)
    examples: dict[str, list[dict[str, Any]]] = {
        "POST /v2/models/{name}/infer": [
            {**named, "body": tensor_request(rows, id="fuzz")},
            {**named, "body": {"instances": [{"age": 30, "income": 2.0, "city": "oslo"}]}},
        ],
        "POST /v2/models/{name}/versions/{version}/infer": [{**pinned, "body": tensor_request(rows)}],
        "GET /v2/models/{name}": [named],
        "GET /v2/models/{name}/versions/{version}": [pinned],
        "GET /v2/models/{name}/ready": [named],
        "GET /v2/models/{name}/versions/{version}/ready": [pinned],
        "GET /v2/models/{name}/stats": [named],
    }
    result = fuzz(served["url"], max_examples=30, timeout_s=15, examples=examples)
    statuses = sorted(set(result.statuses))
    print(f"\nfuzz: {len(result.statuses)} requests over {len(result.operations)} operations, statuses {statuses}")
    assert len(result.operations) >= 5, result.operations
    assert not result.problems, "\n".join(result.problems[:20])
    assert any(code >= 400 for code in statuses) and 200 in statuses  # both kinds of request were made


def _session_processes() -> list[psutil.Process]:
    import ray

    # Every process of this Ray carries its session folder on its command line (or descends from one that does).
    return runtime.head_processes(ray._private.worker._global_node.get_session_dir_path())


def _other_address() -> str | None:
    """An address of this machine that is not loopback, as a client elsewhere on its network would use."""
    for addr in sorted(runtime.local_addresses()):
        if ":" not in addr and not addr.startswith("127."):
            return addr
    return None


def test_nothing_serving_the_model_listens_beyond_loopback(served: dict[str, Any]) -> None:
    procs = _session_processes()
    assert procs, "found no process of this Ray session"
    listening = []
    for p in procs:
        try:
            conns = p.net_connections("tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    app_port = [ip for _, ip, port in listening if port == served["port"]]
    assert app_port and set(app_port) <= {"127.0.0.1", "::ffff:127.0.0.1"}, app_port
    other = _other_address()
    if other is None:
        return  # no other interface to be reached on: the loopback check above is the whole story
    # HAProxy's listeners (ingress, stats page, Prometheus exporter) follow serve.host: loopback here.
    haproxy = [(ip, port) for name, ip, port in listening if name.startswith("haproxy")]
    assert len(haproxy) >= 3 and {ip for ip, _ in haproxy} <= {"127.0.0.1", "::ffff:127.0.0.1"}, haproxy
    # This Ray was started by plain ray.init (not on loopback like fabric's own): every port it exposes beyond
    # loopback (its gRPC ports, its metrics export) is asked for the model's metadata route from the machine's
    # network address: none may serve it.
    exposed = sorted({port for _, ip, port in listening if ip in ("0.0.0.0", "::", "*", other)})
    answered = []
    for port in exposed:
        try:
            r = httpx.get(f"http://{other}:{port}/v2/models/{MODEL}", timeout=3)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
            answered.append((port, [n for n, _, p in listening if p == port], r.text[:100]))
    assert answered == [], f"the model answers on {other} at ports {answered}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{other}:{served['port']}/v2/health/ready", timeout=3)


class _Load:
    """A steady bounded load: ``workers`` threads posting one request after another, each recorded."""

    def __init__(self, url: str, workers: int = 2) -> None:
        self.url = f"{url}/v2/models/{MODEL}/infer"
        self.body = tensor_request(np.ones((1, len(FEATURES)), np.float32))
        self.records: list[tuple[float, bool]] = []  # (monotonic time, succeeded)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    ok = client.post(self.url, json=self.body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.records.append((time.monotonic(), ok))
                time.sleep(0.01)  # steady, not a flood: about 100 req/s per thread at most

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


def _replicas() -> dict[str, int]:
    """The model deployment's replica count per state (``{"RUNNING": 2}``)."""
    from ray import serve

    app = serve.status().applications["fabric"]
    return {getattr(k, "value", k): n for k, n in app.deployments["TabularModel"].replica_states.items()}


def _replica_actor_names() -> list[str]:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and "TabularModel" in a["name"])


def test_a_killed_replica_is_replaced_and_the_app_keeps_answering(served: dict[str, Any]) -> None:
    import ray

    before = _replica_actor_names()
    assert len(before) == 2, before
    with _Load(served["url"]) as load:
        time.sleep(2)  # a steady state first
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        recovered_at = None
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            names = _replica_actor_names()
            if len(names) == 2 and before[0] not in names and _replicas().get("RUNNING") == 2:
                recovered_at = time.monotonic()
                break
            time.sleep(0.2)
        assert recovered_at is not None, f"no replacement replica within 120 s: {_replicas()}"
        # load on the recovered app: a count of requests, not a time (a busy machine answers fewer per second)
        deadline = time.monotonic() + 60
        while sum(t > recovered_at + 1 for t, _ in list(load.records)) < 30 and time.monotonic() < deadline:
            time.sleep(0.2)
    records = list(load.records)
    failed = sum(not ok for _, ok in records)
    after = [ok for t, ok in records if t > recovered_at + 1]
    print(f"\nreplica kill: {len(records)} requests, {failed} failed, recovered in {recovered_at - killed_at:.1f} s")
    assert len(after) > 20 and all(after), "requests failed after the replacement replica was running"
    assert failed < len(records) / 2  # the surviving replica kept answering meanwhile
