"""The serving stream through the drift monitor, end to end, over real Serve HTTP on 127.0.0.1.

One Ray, one monitor actor and one Serve app with the monitor on, shared by the module. The monitor's
reference is what ingestion writes: raw training rows with their labels, which the tiny (random) model
predicts badly; the replica sends the monitor its own predictions on that reference. Ordinary traffic (the
held-out split) is not drift, traffic with two of three features shifted is drift on exactly those two,
the HTML report and the JSON are one computation, tensor values outside the training range are flagged,
the request, batch and monitor metrics reach Ray's Prometheus endpoint, and a reset empties the window.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from fabric.config import load_config
from fabric.runtime import free_port
from tests.unit.serve.models import RAW_COLUMNS, encode, make_model, reference
from tests.unit.serve.serving import fast_path_ray, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny"
MONITOR = "test-serve-monitor"
WINDOW = 300
CHUNK = 20  # rows per request


def _rows(n: int, seed: int, age_shift: float = 0.0, oslo: float = 0.5) -> list[dict[str, Any]]:
    """Raw rows the way the tiny model's preprocessor expects them (age ~ N(40, 10), income ~ N(50, 20))."""
    rng = np.random.default_rng(seed)
    return [
        {"age": float(a), "income": float(i), "city": str(c)}
        for a, i, c in zip(
            rng.normal(40 + age_shift, 10, n),
            rng.normal(50, 20, n),
            rng.choice(["oslo", "paris"], n, p=[oslo, 1 - oslo]),
            strict=True,
        )
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray (fast path), the monitor actor over the reference, and the app with the monitor on."""
    from fabric.monitor import start
    from fabric.serve import deploy

    root = tmp_path_factory.mktemp("serve-monitor")
    folder = make_model(root / "model", seed=0)
    data = _rows(1000 + WINDOW, seed=0)  # a training split and a held-out split of one distribution
    ref = pd.DataFrame(data[:1000])
    ref["target"] = (ref["income"] > 60).astype(int)  # labels, which the random model does not predict
    with fast_path_ray(root / "home"):  # its end ends Serve and the (non-detached) monitor with it
        cfg = load_config(
            None,
            [
                f"run_dir={root / 'runs'}",
                f"serve.port={free_port()}",
                f"serve.model_name={MODEL}",
                f"serve.model_uri={folder}",
                "serve.replica_cpus=0",
                "serve.max_batch_size=16",
                "serve.batch_wait_timeout_s=0.01",
                "monitor.enabled=true",
                f"monitor.actor_name={MONITOR}",
                "monitor.detached=false",
                f"monitor.window_size={WINDOW}",
                "monitor.min_samples=50",
                "monitor.interval_s=3600",  # computed on demand only (GET /monitor/drift?refresh=true)
                "monitor.queue_size=2",  # small, so a burst against a busy monitor drops (and counts) samples
            ],
        )
        # The monitor first: a replica looks it up by name when it starts.
        handle = start(cfg.monitor, ref, target="target", features=RAW_COLUMNS, categorical=["city"])
        result = deploy(cfg, timeout_s=240)
        # the replica hands the monitor its model's predictions on the reference as it starts
        wait_for(lambda: _stats(handle)["prediction_references"] == ["v1"], what="v1's predictions on the reference")
        yield {"url": result.url, "monitor": handle, "folder": folder, "reference": ref, "heldout": data[1000:]}


def _stats(handle: Any) -> dict[str, Any]:
    import ray

    return ray.get(handle.stats.remote(), timeout=30)


def _received(handle: Any) -> int:
    return int(_stats(handle)["received"])


def _send(served: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Serve ``rows`` one request of CHUNK rows at a time; wait until the monitor has them."""
    handle = served["monitor"]
    before = _received(handle)
    with httpx.Client(base_url=served["url"], timeout=30) as c:
        for i in range(0, len(rows), CHUNK):
            r = c.post(f"/v2/models/{MODEL}/infer", json={"instances": rows[i : i + CHUNK]})
            assert r.status_code == 200, r.text
    # Submissions are fire-and-forget: wait for them to land (all of them, or at least half should a very
    # busy machine have made the replica drop some under back-pressure: the window's newest rows still rule).
    state = {"last": -1, "since": time.monotonic()}

    def landed() -> bool:
        got = _received(handle) - before
        if got != state["last"]:
            state["last"], state["since"] = got, time.monotonic()
        return got >= len(rows) or (got >= len(rows) // 2 and time.monotonic() - state["since"] > 3)

    wait_for(landed, timeout_s=60, what=f"{len(rows)} rows at the monitor")


def _within(timeout_s: float, cond: Callable[[], bool]) -> bool:
    """Whether ``cond`` holds within ``timeout_s`` (polled every half second)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _settled(handle: Any, quiet_s: float = 2.0) -> None:
    """Wait until no more rows reach the monitor (submissions are fire-and-forget)."""
    state = {"last": -1, "since": time.monotonic()}

    def quiet() -> bool:
        got = _received(handle)
        if got != state["last"]:
            state["last"], state["since"] = got, time.monotonic()
        return time.monotonic() - state["since"] >= quiet_s

    wait_for(quiet, timeout_s=60, what="the monitor to stop receiving rows")


def _drift(url: str, refresh: bool = True) -> dict[str, Any]:
    r = httpx.get(f"{url}/monitor/drift", params={"refresh": refresh}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_ordinary_traffic_is_not_drift(served: dict[str, Any]) -> None:
    from fabric.monitor.stats import align, column_drift

    heldout = served["heldout"]
    _send(served, heldout)
    result = _drift(served["url"])  # the default thresholds
    assert result["status"] == "ok" and WINDOW // 2 <= result["window_size"] <= WINDOW
    assert set(result["columns"]) == set(RAW_COLUMNS)
    assert result["dataset_drift"] is False and result["drifted_columns"] == []
    pred = result["prediction"]
    assert pred is not None and pred["version"] == "v1" and pred["reference_rows"] == len(served["reference"])
    assert pred["drifted"] is False and result["drift_detected"] is False
    # what comparing the served predictions with the labels (as fabric did) says of this very traffic: drift
    served_preds = pd.Series(reference(served["folder"], encode(heldout)).argmax(axis=1))
    labels = served["reference"]["target"]
    with np.errstate(divide="ignore"):  # the labels lack a class the model predicts: scipy divides by zero
        assert column_drift(align(labels, "cat"), align(served_preds, "cat"), "cat")["drifted"] is True
    # without refresh: the same (last) result, not a new computation, saying when and over how many rows
    last = _drift(served["url"], refresh=False)
    assert last["computed_at"] == result["computed_at"] and last["computed_at_utc"] == result["computed_at_utc"]
    assert last["age_s"] >= 0 and last["window_size"] == result["window_size"]


def test_shifted_features_are_reported_as_drift(served: dict[str, Any]) -> None:
    # age moves up two standard deviations, city goes 90% oslo; income keeps its distribution
    _send(served, _rows(WINDOW, seed=2, age_shift=20, oslo=0.9))
    result = _drift(served["url"])
    assert result["status"] == "ok" and result["drift_detected"] is True
    assert set(result["drifted_columns"]) == {"age", "city"}
    assert result["columns"]["income"]["drifted"] is False
    assert result["dataset_drift"] is True and result["drift_share"] == pytest.approx(2 / 3)
    assert result["columns"]["age"]["test"] and result["columns"]["age"]["score"] is not None


def test_the_html_report_and_the_json_are_one_computation(served: dict[str, Any]) -> None:
    import json

    r = httpx.get(f"{served['url']}/monitor/report", timeout=120)  # of the last result: the shifted traffic
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text[:2000].lower()
    for feature in RAW_COLUMNS:
        assert feature in r.text
    result = _drift(served["url"], refresh=False)
    html = r.text
    start = html.index(">", html.index('id="fabric-drift-result"')) + 1
    embedded = json.loads(html[start : html.index("</script>", start)].replace("<\\/", "</"))
    for key in ("computed_at", "window_size", "number_of_columns", "drifted_columns", "drift_share", "prediction"):
        assert embedded[key] == result[key], key
    assert f"{len(result['drifted_columns'])} of {result['number_of_columns']} columns drifted" in html
    # refresh=true: a report of a computation made now, which the JSON then gives too
    fresh = httpx.get(f"{served['url']}/monitor/report", params={"refresh": True}, timeout=120)
    assert fresh.status_code == 200
    now = _drift(served["url"], refresh=False)
    assert now["computed_at"] > result["computed_at"] and f'"computed_at": {now["computed_at"]}' in fresh.text


def test_tensor_values_outside_the_training_range_are_flagged(served: dict[str, Any]) -> None:
    raw = np.array([[35.0, 60.0, 1.0, 0.0]], np.float32)  # age and income unscaled: far outside training
    before = _stats(served["monitor"])["out_of_range_rows"]
    r = httpx.post(
        f"{served['url']}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": raw.ravel().tolist()}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["out_of_range"] == {"rows": 1, "features": ["age", "income"]}
    wait_for(lambda: _stats(served["monitor"])["out_of_range_rows"] > before, what="the flag at the monitor")
    assert _stats(served["monitor"])["out_of_range_features"]["age"] >= 1


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)", line)
        if m is None or m[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(m[3]), True
    return total if found else None


def test_request_batch_and_monitor_metrics_reach_prometheus(served: dict[str, Any]) -> None:
    import ray

    url, handle = served["url"], served["monitor"]
    one = {"instances": _rows(1, seed=3)}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as c:

            async def client() -> list[int]:
                return [(await c.post(f"/v2/models/{MODEL}/infer", json=one)).status_code for _ in range(5)]

            return [s for codes in await asyncio.gather(*(client() for _ in range(32))) for s in codes]

    def batched() -> bool:
        stats = httpx.get(f"{url}/v2/models/{MODEL}/stats", timeout=30).json()["model_stats"][0]
        return max(b["batch_size"] for b in stats["batch_stats"]) > 1

    port = ray._private.worker.global_worker.node.metrics_export_port  # this node's Prometheus endpoint

    def dropped() -> bool:
        count = _value(
            _scrape(port), "ray_fabric_monitor_dropped_samples_total", monitor=MONITOR, reason="backpressure"
        )
        return (count or 0) > 0

    # Concurrent requests make batches (when they arrive together: a few bursts make sure some do). The
    # monitor's four threads are kept busy writing reports meanwhile, so its acknowledgements lag and the
    # replica's gathered rows outrun its queue of 2 submissions: dropped and counted. How soon depends on the
    # machine's load, so bursts repeat (a bounded number) until both showed.
    for attempt in range(8):
        busy = [handle.report_html.remote(True) for _ in range(4)]
        assert set(asyncio.run(burst())) == {200}
        ray.get(busy, timeout=120)
        if batched() and _within(15.0, dropped):
            break
    sent = 2 * WINDOW // CHUNK + (attempt + 1) * 5 * 32
    assert httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"instances": [{"age": 1}]}).status_code == 422
    _settled(handle)
    last = _drift(url)  # the window no longer changes: every computation from here gives this result
    wanted = {
        "ray_serve_deployment_processing_latency_ms_bucket",  # Serve's request latency histogram
        "ray_serve_deployment_request_counter_total",
        "ray_fabric_serve_responses_total",
        "ray_fabric_serve_rows_total",
        "ray_fabric_serve_batch_size_bucket",
        "ray_fabric_monitor_drift_share",
        "ray_fabric_monitor_feature_drift_score",
        "ray_fabric_monitor_window_size",
        "ray_fabric_monitor_dropped_samples_total",
        "ray_fabric_monitor_submitted_samples_total",
    }

    seen: dict[str, Any] = {}

    def complete() -> str | None:
        text = _scrape(port)
        have = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}
        # the replica publishes every second and Ray exports every few: wait for the counts to catch up
        ok = _value(text, "ray_fabric_serve_responses_total", model=MODEL, version="v1", code="200") or 0
        bad = _value(text, "ray_fabric_serve_responses_total", code="422")
        share = _value(text, "ray_fabric_monitor_drift_share", monitor=MONITOR)
        seen.update(missing=sorted(wanted - have), ok=ok, sent=sent, code_422=bad, drift_share=share)
        if wanted <= have and ok >= sent and bad and share == pytest.approx(last["drift_share"]):
            return text  # the export caught up with the counts and with the last drift result
        if share is None:
            _drift(url)  # publish the drift gauges again (same window, same values)
        return None

    try:
        text = wait_for(complete, timeout_s=180, what="fabric's and Serve's metrics in Ray's Prometheus export")
    except AssertionError as e:
        raise AssertionError(f"{e}; last scrape: {seen}") from None
    assert _value(text, "ray_fabric_serve_rows_total", version="v1") >= 2 * WINDOW + 5 * 32
    calls = _value(text, "ray_fabric_serve_batch_size_count", version="v1")
    singles = _value(text, "ray_fabric_serve_batch_size_bucket", version="v1", le="1.0")
    assert calls is not None and singles is not None and 0 < calls
    assert singles < calls, "no engine call served more than one request"
    assert _value(text, "ray_fabric_monitor_dropped_samples_total", monitor=MONITOR, reason="backpressure") > 0
    assert _value(text, "ray_fabric_monitor_drift_share", monitor=MONITOR) == pytest.approx(last["drift_share"])
    for feature in RAW_COLUMNS:
        score = _value(text, "ray_fabric_monitor_feature_drift_score", monitor=MONITOR, feature=feature)
        assert score == pytest.approx(last["columns"][feature]["score"], rel=1e-6)
    assert _value(text, "ray_fabric_monitor_window_size", monitor=MONITOR) == WINDOW
    assert _value(text, "ray_serve_deployment_processing_latency_ms_count") > 0


def test_the_pipelines_serve_stages_start_the_monitor_and_serve_correct_predictions(
    served: dict[str, Any], tmp_path: Path
) -> None:
    """fabric.pipeline's tail on an already-running Ray, over what ingestion and training leave in a run_dir."""
    import json

    import ray

    from fabric.monitor import get_actor
    from fabric.pipeline import serve_stages

    folder = make_model(tmp_path / "model", seed=3)
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(_rows(500, seed=4)).to_parquet(data / "reference.parquet")
    meta = {"task": "classification", "input_columns": RAW_COLUMNS, "categorical": ["city"]}
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path}",
            "serve.enabled=true",
            f"serve.model_uri={folder}",
            "serve.app_name=pipeline",
            "serve.route_prefix=/pipeline",
            "serve.replica_cpus=0",
            "monitor.actor_name=test-pipeline-monitor",
            "monitor.detached=false",
        ],
    )
    result = serve_stages(cfg)
    assert list(result.stages) == ["monitor", "serve"]
    url = result.stages["serve"].url
    assert url.endswith("/pipeline")
    rows = _rows(8, seed=5)
    model = result.stages["serve"].model_name
    r = httpx.post(f"{url}/v2/models/{model}/infer", json={"instances": rows}, timeout=30)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    expected = reference(folder, encode(rows))
    np.testing.assert_array_equal(out["label"]["data"], expected.argmax(axis=1))
    # the replica found the pipeline's monitor and handed it the served rows
    handle = get_actor("test-pipeline-monitor")
    assert handle is not None
    wait_for(lambda: ray.get(handle.stats.remote(), timeout=30)["received"] == len(rows), what="rows at the monitor")


def test_reset_empties_the_window(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import main

    url, handle = served["url"], served["monitor"]
    assert _stats(handle)["window_size"] > 0
    r = httpx.post(f"{url}/monitor/reset", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["reset"] is True and r.json()["rows_dropped"] > 0
    after = _drift(url, refresh=False)
    assert after["status"] == "insufficient_data" and after["window_size"] == 0
    _send(served, _rows(CHUNK, seed=7))
    assert _stats(handle)["window_size"] == CHUNK
    assert main(["monitor", "reset", f"monitor.actor_name={MONITOR}"]) == 0
    assert f"window reset ({CHUNK} rows dropped)" in capsys.readouterr().out
    assert _stats(handle)["window_size"] == 0
