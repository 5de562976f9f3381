"""Real Ray Serve on 127.0.0.1 (fast path: HAProxy ingress) serving two versions of a model (one wide, one tiny).

One deployment for the module (Ray and Serve start in seconds, not milliseconds): predictions through
every endpoint against the model run directly, batching under concurrent load, the traffic split's
weights and a run-time weight change under load, bad input's 4xx (strict named input), an engine failure's
JSON 500 with its request id, the CLI's status and set-traffic. A third version, ``broken`` (weight 0, only
reached when pinned), runs an ONNX graph that fails at run time for some inputs.
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
from tests.unit.serve.serving import fast_path_ray, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny"


def _failing_onnx(path: Path) -> Path:
    """An ONNX model of the tiny model's shape whose engine call fails when input[:, 0] is not 0, 1 or 2: it
    gathers rows of a 3x3 table at those indices (ONNX Runtime raises on an index out of bounds)."""
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel().tolist())
    nodes = [
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),  # [N, 1]
        helper.make_node("Squeeze", ["first", "axes"], ["col"]),  # [N]
        helper.make_node("Cast", ["col"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["output"], axis=0),  # [N, 3]
    ]
    graph = helper.make_graph(
        nodes,
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        initializer=[table],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray with the fast-path environment, and the app deployed."""
    from fabric.serve import deploy

    root = tmp_path_factory.mktemp("serve")
    # Version a is wide (about 2.5 ms an engine call here): while one call runs, concurrent requests queue behind
    # it, so batches form whatever the load on the machine (a microsecond model answers before the next arrives).
    folders = {
        "a": make_model(root / "a", seed=0, hidden_size=2048, num_layers=4),
        "b": make_model(root / "b", seed=1),
    }
    failing = _failing_onnx(root / "failing.onnx")
    versions = (
        f"[{{name: a, model_uri: {folders['a']}, weight: 80}}, {{name: b, model_uri: {folders['b']}, weight: 20}}, "
        f"{{name: broken, model_uri: {folders['a']}, onnx_path: {failing}, weight: 0}}]"
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
    assert meta["versions"] == ["a", "b", "broken"] and meta["inputs"][0]["shape"] == [-1, 4]
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

    # Version a's engine call takes milliseconds: the requests arriving meanwhile join the next batch.
    codes = asyncio.run(load())
    assert codes == [200] * len(codes)
    sizes = {b["batch_size"]: b["count"] for b in stats()["batch_stats"]}
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
        assert set_traffic({"b": 100}) == {"a": 0.0, "b": 100.0, "broken": 0.0}
        after = _shares(url, 60)
        assert after == Counter({"b": 60})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(codes) > 20 and set(codes) == {200}
    # back to a split: both versions answer again
    assert set_traffic({"a": 50, "b": 50}) == {"a": 50.0, "b": 50.0, "broken": 0.0}
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
    # named input is strict: a null where training had none, a number sent as a string: 422 naming row and field
    row = {"age": 30, "income": 70.0, "city": "oslo"}
    for bad, kind, loc in (
        ({**row, "age": None}, "invalid_value", "instances[1].age"),
        ({**row, "income": "14.2"}, "invalid_datatype", "instances[1].income"),
    ):
        r = _post(url, {"instances": [row, bad]})
        assert r.status_code == 422, r.text
        err = r.json()
        assert (err["type"], err["loc"]) == (kind, loc) and "row 1" in err["error"]
    # income held nulls in training: filled as training did; a column the model does not read is reported
    r = _post(url, {"instances": [{**row, "income": None, "note": "x"}]})
    assert r.status_code == 200 and r.json()["parameters"] == {"ignored_columns": ["note"]}
    assert _post(url, tensor_request(np.zeros((1, 4), np.float32))).status_code == 200
    [app] = status("fabric")
    assert app["status"] == "RUNNING" and app["deployments"]["TabularModel"]["replicas"] == {"RUNNING": 1}


def test_cli_status_and_set_traffic(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import main

    assert main(["serve", "set-traffic", "a=70", "b=30"]) == 0
    assert "a=70%" in capsys.readouterr().out
    assert main(["serve", "status"]) == 0
    out = capsys.readouterr().out
    assert "fabric  RUNNING" in out and "traffic: a=70, b=30, broken=0" in out
    assert main(["serve", "set-traffic", "c=10"]) == 2
    assert "unknown version" in capsys.readouterr().err
    assert Path(os.environ["FABRIC_HOME"], "serve.json").is_file()


def test_an_engine_failure_is_a_json_500_whose_request_id_is_in_the_replica_log(served: dict[str, Any]) -> None:
    import ray

    path = f"/v2/models/{MODEL}/versions/broken/infer"
    ok = np.zeros((2, 4), np.float32)
    assert _post(served["url"], tensor_request(ok), path).status_code == 200  # indices 0: the engine answers
    r = _post(served["url"], tensor_request(ok + 7), path)  # index 7 of a 3-row table: ONNX Runtime raises
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert body["type"] == "internal" and "Gather" in body["error"]
    rid = body["request_id"]
    assert rid and r.headers["x-request-id"] == rid  # the id Serve's ingress gave the request
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"

    def logged() -> bool:
        return any(rid in f.read_text(errors="replace") for f in logs.glob("replica_*.log"))

    wait_for(logged, timeout_s=30, what=f"request id {rid} in a replica log under {logs}")
    assert _post(served["url"], tensor_request(ok)).status_code == 200  # the replica stays up
