"""The HTTP layer end to end without Ray: FastAPI TestClient over the real service and engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fabric.config import load_config
from fabric.serve.api import make_api, make_asgi
from fabric.serve.service import build_service
from tests.unit.serve.models import FEATURES, encode, make_model, reference, softmax, tensor_request

URL = "/v2/models/m/infer"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "clf": make_model(root / "clf", seed=0),
        "clf2": make_model(root / "clf2", seed=1, onnx=False),
        "reg": make_model(root / "reg", task="regression", preprocessor=False, onnx=False),
    }


class Recorder:
    """A monitor hook that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, Any]] = []

    def observe(self, version: str, rows: Any, predictions: Any) -> None:
        self.seen.append((version, rows, predictions))

    def observe_out_of_range(self, version: str, rows: int, flagged: int, features: Any) -> None:
        self.seen.append((version, "out_of_range", (rows, flagged, dict(features))))

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        return {"drift": False, "refresh": refresh}

    async def report(self, refresh: bool = False) -> str:
        return f"<html>report refresh={refresh}</html>"

    async def reset(self) -> dict[str, Any]:
        return {"reset": True}


def _client(tmp_path: Path, overrides: list[str], monitor: Any = None, fast: bool = True) -> TestClient:
    """A client of what a replica serves (the inference fast path over FastAPI), or of FastAPI alone."""
    cfg = load_config(None, ["serve.model_name=m", "monitor.enabled=false", f"run_dir={tmp_path}", *overrides])
    build = make_asgi if fast else make_api
    return TestClient(build(build_service(cfg, monitor=monitor), cfg.serve.max_body_bytes))


@pytest.fixture(scope="module")
def client(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _client(
        tmp_path_factory.mktemp("run"), [f"serve.model_uri={folders['clf']}", "serve.max_body_bytes=4096"]
    ) as c:
        yield c


def _check_classification(body: dict[str, Any], expected_logits: np.ndarray) -> None:
    outs = {o["name"]: o for o in body["outputs"]}
    probs = np.asarray(outs["probabilities"]["data"], dtype=np.float32).reshape(outs["probabilities"]["shape"])
    np.testing.assert_allclose(probs, softmax(expected_logits), atol=1e-5)
    assert outs["label"]["data"] == softmax(expected_logits).argmax(axis=1).tolist()
    assert outs["label"]["datatype"] == "INT64" and outs["probabilities"]["datatype"] == "FP32"


def test_tensor_input_matches_the_model_run_directly(client: TestClient, folders: dict[str, Path]) -> None:
    x = np.random.default_rng(0).standard_normal((5, len(FEATURES))).astype(np.float32)
    r = client.post(URL, json=tensor_request(x, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "m" and body["model_version"] == "v1" and body["id"] == "req-1"
    assert r.headers["x-fabric-model-version"] == "v1"
    _check_classification(body, reference(folders["clf"], x))


def test_nested_tensor_data_and_integer_datatypes_are_accepted(client: TestClient, folders: dict[str, Path]) -> None:
    x = np.array([[1, 0, 1, 0], [2, 1, 0, 1]])
    req = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "INT64", "data": x.tolist()}]}
    r = client.post(URL, json=req)
    assert r.status_code == 200, r.text
    _check_classification(r.json(), reference(folders["clf"], x.astype(np.float32)))


ROWS = [
    {"age": 35, "income": 80.5, "city": "oslo"},
    {"age": 61, "income": 20, "city": "paris"},
    {"age": 18, "income": 55, "city": "rome"},
]


def test_named_columns_go_through_the_preprocessor(client: TestClient, folders: dict[str, Path]) -> None:
    req = {
        "inputs": [
            {"name": "age", "shape": [3], "datatype": "INT32", "data": [r["age"] for r in ROWS]},
            {"name": "income", "shape": [3, 1], "datatype": "FP64", "data": [r["income"] for r in ROWS]},
            {"name": "city", "shape": [3], "datatype": "BYTES", "data": [r["city"] for r in ROWS]},
        ]
    }
    r = client.post(URL, json=req)
    assert r.status_code == 200, r.text
    _check_classification(r.json(), reference(folders["clf"], encode(ROWS)))


def test_records_input(client: TestClient, folders: dict[str, Path]) -> None:
    # income and city held nulls in training: filled as training did; the extra column is reported
    rows = [*ROWS, {"age": 50, "income": None, "city": None, "extra": "ignored"}]
    r = client.post(URL, json={"instances": rows})
    assert r.status_code == 200, r.text
    _check_classification(r.json(), reference(folders["clf"], encode(rows)))
    assert r.json()["parameters"] == {"ignored_columns": ["extra"]}
    assert "parameters" not in client.post(URL, json={"instances": ROWS}).json()


@pytest.mark.parametrize(
    ("body", "kind", "loc", "names"),
    [
        # a null where training had none: refused, not imputed
        (
            {"instances": [*ROWS, {"age": None, "income": 1, "city": "oslo"}]},
            "invalid_value",
            "instances[3].age",
            "row 3",
        ),
        # a number sent as a string: refused, not parsed
        ({"instances": [ROWS[0], {**ROWS[1], "income": "14.2"}]}, "invalid_datatype", "instances[1].income", "'14.2'"),
        (
            {
                "inputs": [
                    {"name": "age", "shape": [2], "datatype": "FP32", "data": [30, None]},
                    {"name": "income", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                    {"name": "city", "shape": [2], "datatype": "BYTES", "data": ["oslo", "paris"]},
                ]
            },
            "invalid_value",
            "inputs[0].data[1]",
            "row 1",
        ),
        (
            {
                "inputs": [
                    {"name": "age", "shape": [1], "datatype": "FP32", "data": [30]},
                    {"name": "income", "shape": [1], "datatype": "BYTES", "data": ["14.2"]},
                    {"name": "city", "shape": [1], "datatype": "BYTES", "data": ["oslo"]},
                ]
            },
            "invalid_datatype",
            "inputs[1].data[0]",
            "'income'",
        ),
    ],
)
def test_named_input_is_strict(client: TestClient, body: dict[str, Any], kind: str, loc: str, names: str) -> None:
    r = client.post(URL, json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert (err["type"], err["loc"]) == (kind, loc)
    assert names in err["error"]


def test_impute_nulls_fills_nulls_as_training_did(folders: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"age": None, "income": 70, "city": "oslo"}]
    with _client(tmp_path, [f"serve.model_uri={folders['clf']}", "serve.impute_nulls=true"]) as c:
        r = c.post(URL, json={"instances": rows})
        assert r.status_code == 200, r.text
        _check_classification(r.json(), reference(folders["clf"], encode(rows)))
        # a string in a numeric column stays refused: there is nothing to impute
        assert c.post(URL, json={"instances": [{**rows[0], "age": "30"}]}).status_code == 422


def test_tensor_values_outside_the_training_range_are_flagged(folders: dict[str, Path], tmp_path: Path) -> None:
    hook = Recorder()
    raw = np.array([[35.0, 60.0, 1.0, 0.0], [0.1, -0.5, 0.0, 1.0]], np.float32)  # row 0: unscaled age, income
    with _client(tmp_path, [f"serve.model_uri={folders['clf']}"], monitor=hook) as c:
        r = c.post(URL, json=tensor_request(raw))
        assert r.status_code == 200, r.text
        assert r.json()["parameters"] == {"out_of_range": {"rows": 1, "features": ["age", "income"]}}
        ok = c.post(URL, json=tensor_request(raw[1:]))
        assert "parameters" not in ok.json()
    assert hook.seen == [
        ("v1", "out_of_range", (2, 1, {"age": 1, "income": 1})),
        ("v1", "out_of_range", (1, 0, {})),
    ]


def test_requested_outputs_only(client: TestClient) -> None:
    r = client.post(URL, json=tensor_request(np.zeros((2, 4), np.float32), outputs=[{"name": "label"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]


def _big(n: int) -> bytes:
    return b'{"instances": [' + b",".join([b'{"age": 1, "income": 2, "city": "oslo"}'] * n) + b"]}"


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "names"),
    [
        ({"content": b"{not json"}, 400, "invalid_json", None),
        ({"content": b"[1]"}, 422, "invalid_request", None),
        ({"json": tensor_request(np.zeros((1, 3), np.float32))}, 422, "invalid_shape", "[rows, 4]"),
        ({"json": tensor_request(np.zeros((4,), np.float32))}, 422, "invalid_shape", "[rows, 4]"),
        (
            {"json": {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "three", 4]}]}},
            422,
            "invalid_datatype",
            "'three'",
        ),
        (
            {"json": {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "BYTES", "data": ["a"] * 4}]}},
            422,
            "invalid_datatype",
            "numeric",
        ),
        (
            {"json": {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, None, 3, 4]}]}},
            422,
            "invalid_value",
            "'income'",
        ),
        (
            {
                "content": b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, NaN, 4]}]}'
            },
            422,
            "invalid_value",
            "'city=oslo'",
        ),
        (
            {
                "content": b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, Infinity]}]}'
            },
            422,
            "invalid_value",
            "finite",
        ),
        ({"json": {"instances": [{"age": 1, "city": "oslo"}]}}, 422, "missing_feature", "'income'"),
        (
            {
                "json": {
                    "inputs": [
                        {"name": "age", "shape": [1], "datatype": "FP32", "data": [1]},
                        {"name": "city", "shape": [1], "datatype": "BYTES", "data": ["oslo"]},
                    ]
                }
            },
            422,
            "missing_feature",
            "'income'",
        ),
        (
            {
                "json": {
                    "inputs": [
                        {"name": "age", "shape": [1], "datatype": "FP32", "data": [1]},
                        {"name": "zip", "shape": [1], "datatype": "FP32", "data": [1]},
                    ]
                }
            },
            422,
            "unknown_input",
            "'zip'",
        ),
        (
            {
                "json": {
                    "inputs": [
                        {"name": "age", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                        {"name": "income", "shape": [1], "datatype": "FP32", "data": [1]},
                        {"name": "city", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
                    ]
                }
            },
            422,
            "invalid_shape",
            "rows",
        ),
        ({"json": {"instances": [{"age": "old", "income": 1, "city": "oslo"}]}}, 422, "invalid_datatype", "'age'"),
        (
            {"json": tensor_request(np.zeros((1, 4), np.float32), outputs=[{"name": "logits"}])},
            422,
            "unknown_output",
            "'logits'",
        ),
        ({"json": {"instances": []}}, 422, "invalid_request", None),
        ({"content": _big(200)}, 413, "body_too_large", "4096"),
        ({"content": iter([_big(200)])}, 413, "body_too_large", "4096"),  # chunked: no Content-Length
    ],
)
def test_bad_input_gets_its_4xx_with_a_json_error(
    client: TestClient, kwargs: dict[str, Any], status: int, kind: str, names: str | None
) -> None:
    r = client.post(URL, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == kind and err["error"]
    if names:
        assert names in err["error"]
    # the replica keeps answering after every bad request
    assert client.post(URL, json=tensor_request(np.zeros((1, 4), np.float32))).status_code == 200


def test_unknown_model_version_and_route_are_404(client: TestClient) -> None:
    r = client.post("/v2/models/nope/infer", json=tensor_request(np.zeros((1, 4), np.float32)))
    assert (r.status_code, r.json()["type"]) == (404, "unknown_model")
    r = client.post("/v2/models/m/versions/v9/infer", json=tensor_request(np.zeros((1, 4), np.float32)))
    assert (r.status_code, r.json()["type"]) == (404, "unknown_version")
    r = client.get("/v3/anything")
    assert r.status_code == 404 and r.json()["type"] == "not_found"
    assert client.get(URL).status_code == 405


def test_metadata_health_and_openapi(client: TestClient) -> None:
    meta = client.get("/v2/models/m").json()
    assert meta["name"] == "m" and meta["versions"] == ["v1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert meta["parameters"]["input_columns"] == ["age", "income", "city"]
    assert client.get("/v2/models/m/versions/v1").json()["versions"] == ["v1"]
    assert client.get("/v2/models/m/ready").json()["ready"] is True
    assert client.get("/v2/models/m/versions/v1/ready").status_code == 200
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "fabric"
    spec = client.get("/openapi.json").json()
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert {"InferenceRequest", "RecordsRequest", "InferenceResponse", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )
    stats = client.get("/v2/models/m/stats").json()["model_stats"][0]
    assert stats["version"] == "v1" and stats["execution_count"] >= 1


def test_openapi_declares_every_error_with_its_json_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            answers = op["responses"]
            assert answers["500"]["content"]["application/json"]["schema"] == error, (method, path)
            for status, answer in answers.items():
                if status[0] in "45":  # JSON on the HTML report route too (FastAPI files it under text/html)
                    assert list(answer["content"]) == ["application/json"], (method, path, status)
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert {"200", "400", "404", "413", "422", "500"} <= set(infer)
    assert spec["paths"]["/monitor/report"]["get"]["responses"]["200"]["content"].keys() == {"text/html"}
    ready = spec["paths"]["/v2/health/ready"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ReadyResponse"}


def test_monitor_routes_are_404_when_monitoring_is_off(client: TestClient) -> None:
    r = client.get("/monitor/drift")
    assert (r.status_code, r.json()["type"]) == (404, "monitor_disabled")
    assert client.get("/monitor/report").status_code == 404


def test_the_monitor_hook_sees_raw_rows_and_predictions(folders: dict[str, Path], tmp_path: Path) -> None:
    hook = Recorder()
    with _client(tmp_path, [f"serve.model_uri={folders['clf']}"], monitor=hook) as c:
        assert c.post(URL, json={"instances": ROWS}).status_code == 200
        assert c.post(URL, json=tensor_request(np.zeros((1, 4), np.float32))).status_code == 200
        assert c.get("/monitor/drift?refresh=true").json() == {"drift": False, "refresh": True}
        assert "refresh=True" in c.get("/monitor/report?refresh=true").text
        assert c.post("/monitor/reset").json() == {"reset": True}
    version, rows, preds = hook.seen[0]
    assert version == "v1" and rows == ROWS and len(preds) == 3 and all(isinstance(p, int) for p in preds)
    # tensor input carries no raw rows: only its range check reaches the monitor
    assert hook.seen[1] == ("v1", "out_of_range", (1, 0, {})) and len(hook.seen) == 2


def test_not_null_expectations_reject_nulls_in_named_input(folders: dict[str, Path], tmp_path: Path) -> None:
    with _client(tmp_path, [f"serve.model_uri={folders['clf']}", "data.expectations.not_null=[age]"]) as c:
        r = c.post(URL, json={"instances": [{"age": None, "income": 1, "city": "oslo"}]})
        assert r.status_code == 422 and "'age'" in r.json()["error"] and r.json()["loc"] == "instances[0].age"
        assert c.post(URL, json={"instances": [{"age": 30, "income": None, "city": "oslo"}]}).status_code == 200


def test_regression_without_preprocessor_uses_encoded_column_names(folders: dict[str, Path], tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with _client(tmp_path, [f"serve.model_uri={folders['reg']}", "serve.engine=torch"]) as c:
        r = c.post(URL, json=tensor_request(x))
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]
        assert [o["name"] for o in out] == ["prediction"] and out[0]["shape"] == [3]
        np.testing.assert_allclose(out[0]["data"], reference(folders["reg"], x)[:, 0], atol=1e-5)
        records = [dict(zip(FEATURES, row.tolist(), strict=True)) for row in x]
        r2 = c.post(URL, json={"instances": records})
        np.testing.assert_allclose(r2.json()["outputs"][0]["data"], out[0]["data"], atol=1e-6)
        bad = c.post(URL, json={"instances": [{**records[0], "city=oslo": None}]})
        assert bad.status_code == 422 and "'city=oslo'" in bad.json()["error"]
        assert c.get("/v2/models/m").json()["platform"] == "pytorch_libtorch"


def test_onnx_is_exported_once_when_the_folder_has_none(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = folders["clf2"]
    assert not (folder / "model.onnx").exists()
    x = np.ones((2, 4), np.float32)
    with _client(tmp_path, [f"serve.model_uri={folder}"]) as c:
        _check_classification(c.post(URL, json=tensor_request(x)).json(), reference(folder, x))
    assert (folder / "model.onnx").is_file()


def test_versions_split_pin_and_stick(folders: dict[str, Path], tmp_path: Path) -> None:
    versions = f"serve.versions=[{{name: a, model_uri: {folders['clf']}, weight: 50}}, {{name: b, model_uri: {folders['clf2']}, weight: 50}}]"
    x = np.ones((1, 4), np.float32)
    with _client(tmp_path, [versions, "serve.sticky_header=x-user"]) as c:
        seen = {c.post(URL, json=tensor_request(x)).headers["x-fabric-model-version"] for _ in range(40)}
        assert seen == {"a", "b"}
        sticky = {
            c.post(URL, json=tensor_request(x), headers={"X-User": "alice"}).headers["x-fabric-model-version"]
            for _ in range(10)
        }
        assert len(sticky) == 1
        pinned = c.post("/v2/models/m/versions/b/infer", json=tensor_request(x))
        assert pinned.json()["model_version"] == "b"
        _check_classification(pinned.json(), reference(folders["clf2"], x))
        assert c.get("/v2/models/m").json()["parameters"]["traffic"] == {"a": 50.0, "b": 50.0}


def test_the_fastapi_routes_answer_exactly_like_the_fast_path(folders: dict[str, Path], tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    bodies: list[dict[str, Any]] = [
        {"json": tensor_request(x, id="same")},
        {"json": {"instances": ROWS}},
        {"content": b"{nope"},
        {"json": tensor_request(np.zeros((1, 3), np.float32))},
        {"content": _big(200)},
    ]
    overrides = [f"serve.model_uri={folders['clf']}", "serve.max_body_bytes=4096"]
    with _client(tmp_path, overrides) as fast, _client(tmp_path, overrides, fast=False) as slow:
        for kwargs in bodies:
            for path in (URL, "/v2/models/m/versions/v1/infer", "/v2/models/x/infer"):
                a, b = fast.post(path, **kwargs), slow.post(path, **kwargs)
                assert a.status_code == b.status_code, (path, kwargs)
                ja, jb = a.json(), b.json()
                ja.pop("id", None), jb.pop("id", None)
                assert ja == jb
                assert a.headers.get("x-fabric-model-version") == b.headers.get("x-fabric-model-version")


def test_responses_are_counted_by_version_and_status(folders: dict[str, Path], tmp_path: Path) -> None:
    """What the replica's fabric_serve_responses metric publishes (fabric.serve.metrics)."""
    cfg = load_config(
        None,
        [
            "serve.model_name=m",
            "monitor.enabled=false",
            f"run_dir={tmp_path}",
            f"serve.versions=[{{name: a, model_uri: {folders['clf']}, weight: 100}}, "
            f"{{name: b, model_uri: {folders['clf2']}, weight: 0}}]",
        ],
    )
    service = build_service(cfg)
    with TestClient(make_asgi(service)) as c:
        for _ in range(3):
            assert c.post(URL, json=tensor_request(np.zeros((1, 4), np.float32))).status_code == 200
        assert c.post("/v2/models/m/versions/b/infer", json={"instances": [{"age": 1}]}).status_code == 422
        assert c.post("/v2/models/nope/infer", json={}).status_code == 404
    assert service.responses == {("a", 200): 3, ("b", 422): 1, ("-", 404): 1}


def test_an_unexpected_failure_is_a_json_500_naming_the_request(
    folders: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last-resort handler: the engine fails (inference fast path), a route fails (FastAPI)."""
    cfg = load_config(None, ["serve.model_name=m", "monitor.enabled=false", f"run_dir={tmp_path}",
                             f"serve.model_uri={folders['clf']}"])  # fmt: skip
    service = build_service(cfg)

    def broken(*_: Any) -> Any:
        raise RuntimeError("engine on fire")

    service.versions["v1"].loaded.engine.shutdown()  # the engine is gone: its next predict fails
    service.statistics = broken  # type: ignore[method-assign]
    with TestClient(make_asgi(service)) as c, caplog.at_level("ERROR", logger="fabric.serve"):
        for method, path, kwargs in (
            ("POST", URL, {"json": tensor_request(np.zeros((1, 4), np.float32))}),
            ("GET", "/v2/models/m/stats", {}),
        ):
            r = c.request(method, path, headers={"x-request-id": f"req-{method}"}, **kwargs)
            assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
            body = r.json()
            assert body["type"] == "internal" and body["request_id"] == f"req-{method}" and "Error:" in body["error"]
            assert any(f"req-{method}" in rec.getMessage() for rec in caplog.records)
        # without the header (no Serve ingress in front): an id is made, answered and logged all the same
        r = c.get("/v2/models/m/stats")
        rid = r.json()["request_id"]
        assert rid and r.headers["x-request-id"] == rid and any(rid in rec.getMessage() for rec in caplog.records)
        assert c.get("/v2/health/live").status_code == 200  # the app keeps serving
