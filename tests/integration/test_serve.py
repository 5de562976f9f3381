"""Real Ray Serve on 127.0.0.1 (fast path: HAProxy ingress) serving two versions of a tiny model.

One deployment for the module (Ray and Serve start in seconds, not milliseconds): predictions through
every endpoint against the model run directly, batching under concurrent load, the traffic split's
weights and a run-time weight change under load, bad input's 4xx, the CLI's status and set-traffic.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fabric.config import load_config
from fabric.runtime import free_port
from tests.unit.serve.models import FEATURES, encode, make_model, reference, softmax, tensor_request
from tests.unit.serve.serving import fast_path_ray

pytestmark = pytest.mark.integration

MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray with the fast-path environment, and the app deployed."""
    from fabric.serve import deploy

    root = tmp_path_factory.mktemp("serve")
    folders = {"a": make_model(root / "a", seed=0), "b": make_model(root / "b", seed=1)}
    versions = (
        f"[{{name: a, model_uri: {folders['a']}, weight: 80}}, {{name: b, model_uri: {folders['b']}, weight: 20}}]"
    )
    with fast_path_ray(root / "home"):
        cfg = load_config(
            None,
            [
                f"run_dir={root / 'runs'}",
                f"serve.port={free_port()}",
                f"serve.model_name={MODEL}",
                f"serve.versions={versions}",
                "serve.sticky_header=x-user",
                "serve.replica_cpus=0",
                "serve.max_batch_size=16",
                "serve.batch_wait_timeout_s=0.02",
                "serve.max_body_bytes=65536",
                "monitor.enabled=false",
            ],
        )
        result = deploy(cfg, timeout_s=240)
        yield {"url": result.url, "folders": folders, "cfg": cfg, "result": result}


def _post(url: str, body: Any, path: str = f"/v2/models/{MODEL}/infer", **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, **kw)


def _probs(resp: httpx.Response) -> np.ndarray:
    out = {o["name"]: o for o in resp.json()["outputs"]}["probabilities"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_the_fast_path_is_on_and_bound_to_localhost(served: dict[str, Any]) -> None:
    from fabric.serve.control import is_fast_path

    assert is_fast_path()
    assert served["result"].fast_path is True
    assert served["url"].startswith("http://127.0.0.1:")


def test_predictions_through_every_endpoint_match_the_model(served: dict[str, Any]) -> None:
    url, folders = served["url"], served["folders"]
    x = np.random.default_rng(0).standard_normal((4, len(FEATURES))).astype(np.float32)
    rows = [{"age": 30, "income": 70.0, "city": "oslo"}, {"age": 55, "income": 20.0, "city": "paris"}]
    columns = {
        "inputs": [
            {"name": "age", "shape": [2], "datatype": "INT64", "data": [r["age"] for r in rows]},
            {"name": "income", "shape": [2], "datatype": "FP32", "data": [r["income"] for r in rows]},
            {"name": "city", "shape": [2], "datatype": "BYTES", "data": [r["city"] for r in rows]},
        ]
    }
    for version in ("a", "b"):
        path = f"/v2/models/{MODEL}/versions/{version}/infer"
        r = _post(url, tensor_request(x), path)
        assert r.status_code == 200, r.text
        assert r.headers["x-fabric-model-version"] == version == r.json()["model_version"]
        np.testing.assert_allclose(_probs(r), softmax(reference(folders[version], x)), atol=1e-5)
        expected = softmax(reference(folders[version], encode(rows)))
        np.testing.assert_allclose(_probs(_post(url, columns, path)), expected, atol=1e-5)
        np.testing.assert_allclose(_probs(_post(url, {"instances": rows}, path)), expected, atol=1e-5)
        assert httpx.get(f"{url}/v2/models/{MODEL}/versions/{version}/ready").json()["ready"] is True
    # the unpinned route answers with one of the two, and says which
    r = _post(url, tensor_request(x))
    v = r.headers["x-fabric-model-version"]
    np.testing.assert_allclose(_probs(r), softmax(reference(folders[v], x)), atol=1e-5)

    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2/models/{MODEL}/ready").json()["ready"] is True
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    assert meta["versions"] == ["a", "b"] and meta["inputs"][0]["shape"] == [-1, 4]
    assert httpx.get(f"{url}/v2").json()["name"] == "fabric"
    assert "/v2/models/{name}/infer" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_batching_batches_under_concurrent_load(served: dict[str, Any]) -> None:
    url = served["url"]
    path = f"/v2/models/{MODEL}/versions/a/infer"
    body = tensor_request(np.ones((1, 4), np.float32))

    async def client(c: httpx.AsyncClient) -> list[int]:
        return [(await c.post(url + path, json=body)).status_code for _ in range(10)]

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as c:
            done = await asyncio.gather(*(client(c) for _ in range(24)))
        return [s for codes in done for s in codes]

    def stats() -> dict[str, Any]:
        return {s["version"]: s for s in httpx.get(f"{url}/v2/models/{MODEL}/stats").json()["model_stats"]}["a"]

    # The tiny model costs microseconds, so the adaptive wait is near zero and batches form from requests
    # that arrive together; a few bursts make sure some do.
    for _ in range(3):
        codes = asyncio.run(load())
        assert codes == [200] * len(codes)
        sizes = {b["batch_size"]: b["count"] for b in stats()["batch_stats"]}
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes
    assert stats()["execution_count"] < stats()["request_count"]


def _shares(url: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    body = tensor_request(np.zeros((1, 4), np.float32))
    counts: Counter[str] = Counter()
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            r = c.post(f"{url}/v2/models/{MODEL}/infer", json=body, headers=headers)
            assert r.status_code == 200, r.text
            counts[r.headers["x-fabric-model-version"]] += 1
    return counts


def test_the_traffic_split_honours_its_weights_and_stickiness(served: dict[str, Any]) -> None:
    n = 500
    counts = _shares(served["url"], n)
    # 80/20: the share of b has sd sqrt(.2 * .8 / 500) ~ 0.018; allow about 4 sd
    assert abs(counts["b"] / n - 0.20) < 0.075, counts
    for user in ("alice", "bob", "carol"):
        assert len(_shares(served["url"], 8, {"X-User": user})) == 1


def test_a_weight_change_is_seen_without_failing_requests(served: dict[str, Any]) -> None:
    from fabric.serve import set_traffic

    url = served["url"]
    body = tensor_request(np.zeros((1, 4), np.float32))
    codes: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                codes.append(c.post(f"{url}/v2/models/{MODEL}/infer", json=body).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert set_traffic({"b": 100}) == {"a": 0.0, "b": 100.0}
        after = _shares(url, 60)
        assert after == Counter({"b": 60})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(codes) > 20 and set(codes) == {200}
    # back to a split: both versions answer again
    assert set_traffic({"a": 50, "b": 50}) == {"a": 50.0, "b": 50.0}
    assert set(_shares(url, 60)) == {"a", "b"}


def test_bad_input_gets_its_4xx_and_the_replica_stays(served: dict[str, Any]) -> None:
    from fabric.serve import status

    url = served["url"]
    infer = f"{url}/v2/models/{MODEL}/infer"
    cases = [
        (httpx.post(infer, content=b"{nope", timeout=30), 400, "invalid_json"),
        (_post(url, tensor_request(np.zeros((1, 3), np.float32))), 422, "invalid_shape"),
        (
            _post(url, {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, "x", 3, 4]}]}),
            422,
            "invalid_datatype",
        ),
        (_post(url, {"instances": [{"age": 1, "city": "oslo"}]}), 422, "missing_feature"),
        (
            httpx.post(
                infer,
                content=b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 1, 2, 3]}]}',
                timeout=30,
            ),
            422,
            "invalid_value",
        ),
        (httpx.post(infer, content=b"x" * 70_000, timeout=30), 413, "body_too_large"),
        (_post(url, tensor_request(np.zeros((1, 4), np.float32)), "/v2/models/other/infer"), 404, "unknown_model"),
    ]
    for resp, code, kind in cases:
        assert resp.status_code == code, resp.text
        assert resp.json()["type"] == kind
    assert _post(url, tensor_request(np.zeros((1, 4), np.float32))).status_code == 200
    [app] = status("fabric")
    assert app["status"] == "RUNNING" and app["deployments"]["TabularModel"]["replicas"] == {"RUNNING": 1}


def test_cli_status_and_set_traffic(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import main

    assert main(["serve", "set-traffic", "a=70", "b=30"]) == 0
    assert "a=70%" in capsys.readouterr().out
    assert main(["serve", "status"]) == 0
    out = capsys.readouterr().out
    assert "fabric  RUNNING" in out and "traffic: a=70, b=30" in out
    assert main(["serve", "set-traffic", "c=10"]) == 2
    assert "unknown version" in capsys.readouterr().err
    assert Path(os.environ["FABRIC_HOME"], "serve.json").is_file()
