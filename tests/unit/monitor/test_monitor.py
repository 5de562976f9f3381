"""DriftMonitor without Ray: drift verdicts, the bounded window, the schedule, checkpoints, callbacks."""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fabric.config import MonitorConfig, PipelineConfig
from fabric.errors import DataValidationError, FabricError
from fabric.monitor import DriftMonitor
from fabric.monitor.stats import evidently_snapshot
from tests.unit.monitor._data import WINDOW, FakeClock, make_frame, model, rows_and_preds


def _monitor(reference: pd.DataFrame, clock: FakeClock, **cfg: Any) -> DriftMonitor:
    """A monitor with version v1's predictions on the reference (what a serving replica sends it)."""
    cfg.setdefault("window_size", WINDOW)
    mon = DriftMonitor(MonitorConfig(**cfg), reference, target="target", task="classification", clock=clock)
    assert mon.set_prediction_reference("v1", model(reference), "toy", mon.fingerprint)
    return mon


def _feed(mon: DriftMonitor, frame: pd.DataFrame, version: str = "v1") -> None:
    rows, preds = rows_and_preds(frame)
    mon.add(rows, preds, version=version)


def _drifted(mon: DriftMonitor, reference: pd.DataFrame, clock: FakeClock) -> DriftMonitor:
    _feed(mon, make_frame(WINDOW, seed=3, age_shift=15, city_p=[0.8, 0.1, 0.1]))
    return mon


# --------------------------------------------------------------------------- drift verdicts


def test_columns_are_typed_as_evidently_infers_them(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    assert mon.kinds == {"age": "num", "income": "num", "plan": "cat", "city": "cat"}
    assert mon.prediction_reference is None  # no prediction column in the sample, and labels never stand in


def test_shifted_input_drifts_on_exactly_the_shifted_features(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _drifted(_monitor(reference, clock), reference, clock)
    result = mon.compute()
    assert result["status"] == "ok"
    assert set(result["drifted_columns"]) == {"age", "city"}
    assert result["drift_share"] == pytest.approx(0.5)
    assert result["dataset_drift"] and result["drift_detected"]
    cols = result["columns"]
    assert cols["age"]["test"] == "ks" and cols["city"]["test"] == "chisquare"
    assert cols["age"]["threshold"] == 0.05
    assert cols["age"]["score"] < 1e-6 and cols["income"]["score"] > 0.05
    assert not cols["income"]["drifted"] and not cols["plan"]["drifted"]
    # the toy model predicts from age: its predictions move with it
    assert result["prediction"]["test"] == "z" and result["prediction"]["drifted"]
    assert result["prediction"]["version"] == "v1" and result["prediction"]["window_rows"] == WINDOW
    assert result["window_size"] == WINDOW and result["reference_size"] == len(reference)
    assert result["computed_at"] == clock.t
    json.dumps(result, allow_nan=False)  # JSON-ready, no NaN


def test_predictions_are_compared_with_the_models_own_not_with_the_labels(
    reference: pd.DataFrame, clock: FakeClock
) -> None:
    # Ordinary traffic through a model that predicts the labels badly (half ones; the labels have 30%).
    mon = DriftMonitor(MonitorConfig(window_size=WINDOW), reference, target="target", clock=clock)
    assert mon.task == "classification"  # typed from the labels, which are not compared
    _feed(mon, make_frame(WINDOW, seed=1))
    before = mon.compute()
    assert before["prediction"] is None and not before["drift_detected"]
    assert mon.set_prediction_reference("v1", model(reference), "toy", mon.fingerprint)
    after = mon.compute()
    assert after["prediction"]["drifted"] is False and not after["drift_detected"]
    # what comparing with the labels would have said: drift, on ordinary traffic
    labels = DriftMonitor(MonitorConfig(window_size=WINDOW), reference.assign(prediction=reference["target"]),
                          target="target", clock=clock)  # fmt: skip
    _feed(labels, make_frame(WINDOW, seed=1))
    assert labels.compute()["prediction"]["drifted"] is True


def test_each_version_is_compared_with_its_own_predictions(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    assert mon.missing_prediction_references({"v1": "toy", "v2": "other"}) == ["v2"]
    assert mon.missing_prediction_references({"v1": "retrained"}) == ["v1"]  # another model behind v1
    assert not mon.set_prediction_reference("v2", [0] * len(reference), "other", "not-this-reference")
    assert mon.set_prediction_reference("v2", [0] * len(reference), "other", mon.fingerprint)
    _feed(mon, make_frame(WINDOW // 2, seed=1), "v1")
    rows, preds = rows_and_preds(make_frame(WINDOW // 2, seed=2))
    mon.add(rows, preds, version="v2")  # v2 said 0 on the whole reference; now it says 1 half the time
    pred = mon.compute()["prediction"]
    assert pred["drifted"] and pred["versions"]["v2"]["drifted"] and not pred["versions"]["v1"]["drifted"]
    assert pred["versions"]["v1"]["window_rows"] == WINDOW // 2
    # a new reference: the predictions on the old one are dropped
    mon.set_reference(make_frame(500, seed=9), target="target", task="classification")
    assert mon.prediction_refs == {} and mon.missing_prediction_references({"v1": "toy"}) == ["v1"]


def test_a_drift_answer_says_when_and_over_how_many_rows(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    _feed(mon, make_frame(WINDOW, seed=1))
    first = mon.answer()
    assert first["computed_at"] == clock.t and first["age_s"] == 0.0 and first["window_size"] == WINDOW
    assert first["computed_at_utc"].endswith("+00:00")
    clock.advance(42)
    again = mon.answer()
    assert again["computed_at"] == first["computed_at"] and again["age_s"] == 42.0
    assert mon.answer(refresh=True)["age_s"] == 0.0


def test_reset_empties_the_window_and_the_last_result(
    reference: pd.DataFrame, clock: FakeClock, tmp_path: Path
) -> None:
    mon = _drifted(_monitor(reference, clock), reference, clock)
    assert mon.compute()["drift_detected"] and mon.drift_active
    assert mon.reset() == WINDOW
    assert mon.window_size == 0 and mon.last_result is None and not mon.drift_active
    assert mon.received == WINDOW and mon.counters()["last_reset_at"] == clock.t  # lifetime counters stay
    assert mon.answer()["status"] == "insufficient_data"
    mon.save(tmp_path / "state.pkl")
    back = DriftMonitor.load(MonitorConfig(window_size=WINDOW), tmp_path / "state.pkl", clock=clock)
    assert back is not None and back.window_size == 0 and back.prediction_refs == mon.prediction_refs


def test_tensor_rows_outside_the_training_range_are_counted(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    mon.count_out_of_range(10, 2, {"age": 2, "income": 1})
    mon.count_out_of_range(5, 1, {"age": 1})
    c = mon.counters()
    assert (c["tensor_rows"], c["out_of_range_rows"], c["out_of_range_features"]) == (15, 3, {"age": 3, "income": 1})


def test_same_distribution_does_not_drift(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    _feed(mon, make_frame(WINDOW, seed=1))
    result = mon.compute()
    assert result["drifted_columns"] == []
    assert not result["drift_detected"] and result["drift_share"] == 0.0
    assert not result["prediction"]["drifted"]


def test_prediction_drift_alone_is_drift(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    rows, _ = rows_and_preds(make_frame(WINDOW, seed=1))
    mon.add(rows, [1] * WINDOW, version="v1")  # the model now predicts one class only
    result = mon.compute()
    assert result["drifted_columns"] == [] and not result["dataset_drift"]
    assert result["prediction"]["drifted"] and result["drift_detected"]


def test_json_shaped_values_match_the_reference_types(reference: pd.DataFrame, clock: FakeClock) -> None:
    # A window from JSON: plan as floats/strings, numbers as strings; none of that is drift.
    frame = make_frame(WINDOW, seed=1)
    rows, preds = rows_and_preds(frame)
    for i, row in enumerate(rows):
        row["plan"] = float(row["plan"]) if i % 2 else str(row["plan"])
        row["age"] = str(row["age"])
    mon = _monitor(reference, clock)
    mon.add(rows, [[1 - p, p] for p in preds], version="v1")  # class probabilities: the argmax is the prediction
    result = mon.compute()
    assert result["drifted_columns"] == [] and not result["prediction"]["drifted"]


def test_stattest_options_apply_per_column_kind(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _drifted(_monitor(reference, clock, cat_stattest="psi", stattest="wasserstein"), reference, clock)
    cols = mon.compute()["columns"]
    assert {c["test"] for n, c in cols.items() if n in ("plan", "city")} == {"psi"}
    assert {c["test"] for n, c in cols.items() if n in ("age", "income")} == {"wasserstein"}
    assert cols["age"]["threshold"] == 0.1 and cols["age"]["drifted"]


def test_regression_prediction_is_numerical(clock: FakeClock) -> None:
    ref = make_frame(500, seed=0).assign(target=lambda d: d["age"] * 2.5)
    mon = DriftMonitor(MonitorConfig(window_size=WINDOW), ref, target="target", clock=clock)
    assert mon.task == "regression"
    assert mon.set_prediction_reference("v1", list(ref["age"] * 2.5), "reg", mon.fingerprint)
    frame = make_frame(WINDOW, seed=1)
    mon.add(frame.drop(columns="target").to_dict("records"), list(frame["age"] * 2.5 + 40), version="v1")
    pred = mon.compute()["prediction"]
    assert pred["kind"] == "num" and pred["test"] == "ks" and pred["drifted"]


def test_a_column_missing_from_the_window_is_skipped(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock)
    rows, preds = rows_and_preds(make_frame(WINDOW, seed=1))
    mon.add([{k: v for k, v in r.items() if k != "income"} for r in rows], preds, version="v1")
    result = mon.compute()
    assert "income" not in result["columns"] and "income" in result["skipped_columns"]
    assert result["number_of_columns"] == 3
    html = mon.report_html()  # Evidently would raise on the empty column: it is left out
    evidently_part = html[html.index("</script>", html.index('id="fabric-drift-result"')) :]
    assert "city" in evidently_part and "income" not in evidently_part


def test_too_few_rows_is_not_an_error(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock, min_samples=50)
    _feed(mon, make_frame(10, seed=1))
    result = mon.compute()
    assert result["status"] == "insufficient_data" and not result["drift_detected"]
    assert result["window_size"] == 10


def test_rows_and_predictions_must_pair_up(reference: pd.DataFrame, clock: FakeClock) -> None:
    with pytest.raises(DataValidationError, match="2 rows but 1 predictions"):
        _monitor(reference, clock).add([{"age": 1}, {"age": 2}], [0])


# --------------------------------------------------------------------------- window and schedule


def test_window_is_bounded_and_keeps_the_newest(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock, window_size=50)
    frame = make_frame(120, seed=1)
    rows, preds = rows_and_preds(frame)
    for i in range(0, 120, 7):
        mon.add(rows[i : i + 7], preds[i : i + 7], dropped=1)
    assert mon.window_size == 50
    assert mon.received == 120 and mon.dropped == 18
    window = mon.window_frame()
    assert len(window) == 50
    assert window["age"].tolist() == frame["age"].tolist()[-50:]
    assert window["prediction"].tolist() == preds[-50:]


def test_schedule_fires_only_after_interval(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock, interval_s=60, min_samples=30)
    _feed(mon, make_frame(WINDOW, seed=1))
    assert mon.maybe_compute() is None
    clock.advance(59.9)
    assert mon.maybe_compute() is None and mon.computations == 0
    clock.advance(0.1)
    assert mon.maybe_compute() is not None and mon.computations == 1
    clock.advance(30)
    assert mon.maybe_compute() is None
    clock.advance(30)
    assert mon.maybe_compute() is not None and mon.computations == 2
    # on demand at any time; the next scheduled run counts from it
    clock.advance(10)
    mon.compute()
    clock.advance(55)
    assert mon.maybe_compute() is None
    clock.advance(5)
    assert mon.maybe_compute() is not None


def test_schedule_waits_for_min_samples(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _monitor(reference, clock, interval_s=10, min_samples=100)
    _feed(mon, make_frame(40, seed=1))
    clock.advance(20)
    assert mon.due() and mon.maybe_compute() is None
    _feed(mon, make_frame(60, seed=2))
    assert mon.maybe_compute() is not None  # stays due: runs as soon as there is enough data


# --------------------------------------------------------------------------- checkpoint


def test_state_round_trip_through_a_file(reference: pd.DataFrame, clock: FakeClock, tmp_path: Path) -> None:
    cfg = MonitorConfig(window_size=WINDOW, interval_s=30)
    mon = DriftMonitor(cfg, reference, target="target", clock=clock)
    mon.set_prediction_reference("v1", model(reference), "toy", mon.fingerprint)
    _drifted(mon, reference, clock)
    mon.add([{"age": 1.0}], [0], dropped=5, version="v1")
    first = mon.compute()
    path = tmp_path / "ckpt" / "state.pkl"
    mon.save(path)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))

    clock.advance(10)
    back = DriftMonitor.load(cfg, path, clock=clock)
    assert back is not None
    pd.testing.assert_frame_equal(back.reference, mon.reference)
    pd.testing.assert_frame_equal(back.window_frame(), mon.window_frame())
    assert (back.target, back.task, back.kinds) == (mon.target, mon.task, mon.kinds)
    assert back.counters() == mon.counters() and back.prediction_refs == mon.prediction_refs
    assert back.last_result == first and back.drift_active
    assert not back.due()  # the schedule continues from the last computation
    clock.advance(20)
    assert back.due()
    again = back.compute()
    assert again["columns"] == first["columns"]
    assert not again["drift_started"]  # the episode carried over: no second webhook/retrain


def test_no_checkpoint_and_a_torn_one_read_as_none(reference: pd.DataFrame, tmp_path: Path) -> None:
    assert DriftMonitor.load(MonitorConfig(), tmp_path / "none.pkl") is None
    (tmp_path / "torn.pkl").write_bytes(b"\x80\x05 not a pickle")
    assert DriftMonitor.read_state(tmp_path / "torn.pkl") is None


def test_from_run_dir_reads_ingestion_outputs(reference: pd.DataFrame, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    ref = reference.rename(columns={"target": "label"}).assign(zip=lambda d: d.index % 50, row_id=range(len(reference)))
    ref.to_parquet(data / "reference.parquet")
    meta = {"task": "classification", "target": "label", "num_classes": 2,
            "input_columns": ["age", "income", "plan", "city", "zip"], "categorical": ["city", "zip"]}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    mon = DriftMonitor.from_run_dir(PipelineConfig(run_dir=str(tmp_path)))
    assert mon.target == "label" and mon.features == ["age", "income", "plan", "city", "zip"]  # not row_id
    assert mon.kinds["zip"] == "cat"  # declared categorical: 50 integer codes Evidently would call numerical


def test_from_run_dir_without_ingestion_says_so(tmp_path: Path) -> None:
    with pytest.raises(FabricError, match="run the ingest stage first"):
        DriftMonitor.from_run_dir(PipelineConfig(run_dir=str(tmp_path)))


# --------------------------------------------------------------------------- report


def test_html_report_renders_with_the_column_names(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _drifted(_monitor(reference, clock), reference, clock)
    mon.compute()
    html = mon.report_html()
    assert html.lstrip().lower().startswith("<html") or "<!doctype html>" in html[:200].lower()
    for col in ("age", "income", "plan", "city", "prediction"):
        assert col in html


def test_the_html_report_and_the_json_are_one_computation(reference: pd.DataFrame, clock: FakeClock) -> None:
    mon = _drifted(_monitor(reference, clock), reference, clock)
    result = mon.compute()
    html = mon.report_html()
    assert mon.computations == 1  # the report is of the last result, not of a computation of its own
    start = html.index(">", html.index('id="fabric-drift-result"')) + 1
    embedded = json.loads(html[start : html.index("</script>", start)].replace("<\\/", "</"))
    for key in ("computed_at", "window_size", "number_of_columns", "drifted_columns", "drift_share"):
        assert embedded[key] == result[key]
    assert "2 of 4 columns drifted" in html and "share 0.500" in html
    # Evidently's part reaches the same verdicts with the same tests and thresholds (the prediction apart)
    counted = evidently_snapshot(mon.reference, mon.window_frame(), result, mon.kinds).dict()["metrics"][0]
    assert counted["value"] == {"count": 2.0, "share": 0.5}
    assert mon.report_html() is html  # rendered once per result
    assert mon.report_html(refresh=True) is not html and mon.computations == 2


def test_html_report_of_an_empty_window_says_so(reference: pd.DataFrame, clock: FakeClock) -> None:
    with pytest.raises(FabricError, match="nothing to report yet"):
        _monitor(reference, clock).report_html()


# --------------------------------------------------------------------------- on drift


class _Hook(BaseHTTPRequestHandler):
    received: queue.Queue[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put({"body": json.loads(body), "content_type": self.headers["Content-Type"]})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Any:
    handler = type("Hook", (_Hook,), {"received": queue.Queue()})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", handler.received
    server.shutdown()
    server.server_close()


def test_webhook_is_posted_once_when_drift_starts(reference: pd.DataFrame, clock: FakeClock, webhook: Any) -> None:
    url, received = webhook
    mon = _drifted(_monitor(reference, clock, webhook_url=url), reference, clock)
    mon.compute()
    got = received.get(timeout=5)
    assert got["content_type"] == "application/json"
    assert got["body"]["event"] == "drift" and got["body"]["monitor"] == mon.name
    assert set(got["body"]["result"]["drifted_columns"]) == {"age", "city"}
    mon.compute()  # still drifting: same episode, no second POST
    with pytest.raises(queue.Empty):
        received.get(timeout=0.3)


def test_unreachable_webhook_is_logged_not_raised(
    reference: pd.DataFrame, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    mon = _monitor(reference, clock, webhook_url="http://127.0.0.1:9/hook", webhook_timeout_s=1)
    _drifted(mon, reference, clock)
    result = mon.compute()
    assert result["drift_detected"]
    assert "webhook" in caplog.text and "failed" in caplog.text
    assert "drift detected" in caplog.text and "age" in caplog.text  # the log line names the columns


class _FakeJobs:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.addresses: list[str | None] = []

    def __call__(self, address: str | None) -> _FakeJobs:
        self.addresses.append(address)
        return self

    def submit_job(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return f"raysubmit_{len(self.calls)}"


def test_retraining_job_gets_the_window_and_respects_cooldown(
    reference: pd.DataFrame, clock: FakeClock, tmp_path: Path
) -> None:
    jobs = _FakeJobs()
    cfg = MonitorConfig(window_size=WINDOW, retrain=True, retrain_cooldown_s=600, retrain_address="http://head:8265")
    mon = DriftMonitor(cfg, reference, target="target", clock=clock, work_dir=tmp_path, run_dir="runs/x",
                       job_client_factory=jobs)  # fmt: skip
    _drifted(mon, reference, clock)
    mon.compute()
    assert len(jobs.calls) == 1 and jobs.addresses == ["http://head:8265"]
    call = jobs.calls[0]
    window_path = next((tmp_path / "windows").glob("*.parquet"))
    assert call["entrypoint"] == f"python jobs/train.py data.source={window_path} run_dir=runs/x"
    assert call["metadata"]["reason"] == "drift"
    written = pd.read_parquet(window_path)
    assert len(written) == WINDOW and {"age", "income", "plan", "city", "prediction"} <= set(written.columns)
    assert mon.counters()["last_retrain_job"] == "raysubmit_1"

    # drift ends, starts again within the cooldown: no second job; after it: one more
    _feed(mon, make_frame(WINDOW, seed=1))
    assert not mon.compute()["drift_detected"]
    _drifted(mon, reference, clock)
    clock.advance(300)
    mon.compute()
    assert len(jobs.calls) == 1
    _feed(mon, make_frame(WINDOW, seed=1))
    mon.compute()
    _drifted(mon, reference, clock)
    clock.advance(301)
    mon.compute()
    assert len(jobs.calls) == 2


def test_window_with_json_mixed_types_writes_as_parquet(
    reference: pd.DataFrame, clock: FakeClock, tmp_path: Path
) -> None:
    mon = _monitor(reference, clock)
    mon.add([{"age": "41.5", "plan": 1, "city": "rome", "note": 3}, {"age": 39, "plan": "2", "city": 7, "note": "x"}],
            [1, [0.9, 0.1]], version="v1")  # fmt: skip
    written = pd.read_parquet(mon.write_window(tmp_path / "w.parquet"))
    assert written["age"].tolist() == [41.5, 39.0] and written["plan"].tolist() == [1, 2]
    assert written["city"].tolist() == ["rome", "7"] and written["note"].tolist() == ["3", "x"]
    assert written["prediction"].tolist() == [1, 0]


def test_retraining_is_off_by_default(reference: pd.DataFrame, clock: FakeClock) -> None:
    jobs = _FakeJobs()
    mon = DriftMonitor(MonitorConfig(window_size=WINDOW), reference, target="target", clock=clock,
                       job_client_factory=jobs)  # fmt: skip
    _drifted(mon, reference, clock)
    assert mon.compute()["drift_detected"] and jobs.calls == []


def test_unreachable_job_api_does_not_break_the_monitor(
    reference: pd.DataFrame, clock: FakeClock, tmp_path: Path
) -> None:
    def broken(address: str | None) -> Any:
        raise FabricError("cannot reach the Ray job API")

    cfg = MonitorConfig(window_size=WINDOW, retrain=True)
    mon = DriftMonitor(cfg, reference, target="target", clock=clock, work_dir=tmp_path, job_client_factory=broken)
    _drifted(mon, reference, clock)
    assert mon.compute()["drift_detected"] and mon.last_retrain_job is None


def test_a_numeric_column_with_few_values_gets_its_categorical_test_in_the_report(
    reference: pd.DataFrame, clock: FakeClock
) -> None:
    # a float column with few values (Fair's `children`): Evidently types it numerical yet tests it with chisquare
    ref = reference.assign(rating=[(i % 4) * 0.5 for i in range(len(reference))])
    mon = _monitor(ref, clock)
    window = make_frame(WINDOW, seed=3).assign(rating=[(i % 4) * 0.5 for i in range(WINDOW)])
    _feed(mon, window)
    result = mon.compute()
    assert mon.kinds["rating"] == "num" and result["columns"]["rating"]["test"] == "chisquare"
    assert "rating" in mon.report_html()  # Evidently refused chisquare on a column it was told is numerical
