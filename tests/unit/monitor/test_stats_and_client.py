"""Pure drift helpers, the monitor config, and the client's sampling and back-pressure (a fake actor, no Ray)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fabric.config import MonitorConfig, load_config
from fabric.errors import ConfigError, DataValidationError
from fabric.monitor import MonitorClient, MonitorUnavailableError, stats


@pytest.mark.parametrize(
    ("value", "key"),
    [(1, "1"), (1.0, "1"), (np.int64(1), "1"), ("1", "1"), (True, "True"), (2.5, "2.5"), (None, None),
     (float("nan"), None), ("paris", "paris")],
)  # fmt: skip
def test_category_key_unifies_json_and_parquet_values(value: Any, key: str | None) -> None:
    assert stats.category_key(value) == key


@pytest.mark.parametrize(("pred", "value"), [(3, 3), ([0.2, 0.8], 1), (np.array([0.7, 0.2, 0.1]), 0), ([4.5], 4.5)])
def test_prediction_value_takes_argmax_of_scores(pred: Any, value: Any) -> None:
    assert stats.prediction_value(pred) == value


def test_column_drift_of_one_column() -> None:
    rng = np.random.default_rng(0)
    ref, same, moved = rng.normal(0, 1, 500), rng.normal(0, 1, 300), rng.normal(1, 1, 300)
    ok = stats.column_drift(pd.Series(ref), pd.Series(same), "num")
    bad = stats.column_drift(pd.Series(ref), pd.Series(moved), "num")
    assert ok["test"] == bad["test"] == "ks"
    assert not ok["drifted"] and bad["drifted"] and bad["score"] < ok["score"]
    empty = stats.column_drift(pd.Series(ref), pd.Series([np.nan] * 5), "num")
    assert empty["skipped"] == "no values in the window" and not empty["drifted"]


def test_monitor_config_rejects_unknown_tests_and_entrypoint_fields(tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["monitor.num_stattest=chisquare", "monitor.retrain_entrypoint=python x.py {data}"])
    assert {p.path for p in info.value.problems} == {"monitor.num_stattest", "monitor.retrain_entrypoint"}
    assert not MonitorConfig().retrain  # the closed loop is opt-in


# --------------------------------------------------------------------------- client, against a fake actor


class _Ref:
    def __init__(self, fut: Future[int]) -> None:
        self._fut = fut

    def future(self) -> Future[int]:
        return self._fut


class _FakeActor:
    """Holds every submission's future so the test decides when the 'actor' acknowledges."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, list | None, int]] = []
        self.futures: list[Future[int]] = []
        outer = self

        class _Method:
            def remote(self, rows: list, preds: list | None, dropped: int, version: str | None = None) -> _Ref:
                outer.calls.append((rows, preds, dropped))
                fut: Future[int] = Future()
                outer.futures.append(fut)
                return _Ref(fut)

        self.add = _Method()

    def ack_all(self) -> None:
        for f in self.futures:
            if not f.done():
                f.set_result(1)


def _client(**kw: Any) -> tuple[MonitorClient, _FakeActor]:
    client = MonitorClient(MonitorConfig(**kw), lookup_interval_s=3600)
    actor = _FakeActor()
    client._handle = actor  # type: ignore[assignment]
    return client, actor


def test_submit_drops_and_counts_under_backpressure_without_waiting() -> None:
    client, actor = _client(queue_size=3)
    rows = [{"a": 1.0}, {"a": 2.0}]
    start = time.perf_counter()
    sent = [client.submit(rows, [0, 1]) for _ in range(10)]
    assert time.perf_counter() - start < 0.5
    assert sent == [2, 2, 2] + [0] * 7
    assert client.in_flight == 3 and client.dropped == 14 and client.sent == 6
    actor.ack_all()
    assert client.in_flight == 0
    assert client.submit(rows, [0, 1]) == 2
    assert actor.calls[-1][2] == 14  # the drops ride along with the next submission that goes through
    assert client.submit(rows, [0, 1]) == 2 and actor.calls[-1][2] == 0


def test_failed_submission_is_counted_and_frees_its_slot() -> None:
    client, actor = _client(queue_size=1)
    client.submit([{"a": 1}], [0])
    actor.futures[0].set_exception(RuntimeError("boom"))
    assert client.in_flight == 0 and client.failed == 1
    assert client.submit([{"a": 1}], [0]) == 1


def test_sampling_keeps_about_the_sample_rate() -> None:
    client, actor = _client(sample_rate=0.25)
    client._rng.seed(0)
    total = sum(client.submit([{"a": i}], [i]) for i in range(2000))
    assert 400 < total < 600 and client.dropped == 0
    kept_rows, kept_preds = actor.calls[0][0], actor.calls[0][1]
    assert kept_rows[0]["a"] == kept_preds[0]  # rows and predictions are sampled together


def test_dataframe_rows_and_numpy_predictions_are_accepted() -> None:
    client, actor = _client()
    rows = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]})
    assert client.submit(rows, np.array([[0.1, 0.9], [0.8, 0.2]])) == 2
    sent_rows, sent_preds, _ = actor.calls[0]
    assert sent_rows == [{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}]
    assert sent_preds == [[0.1, 0.9], [0.8, 0.2]]  # plain lists; the monitor takes the argmax


def test_length_mismatch_is_a_caller_bug() -> None:
    client, _ = _client()
    with pytest.raises(DataValidationError):
        client.submit([{"a": 1}], [0, 1])


def test_without_ray_the_client_drops_and_reads_raise() -> None:
    client = MonitorClient(MonitorConfig())
    assert client.submit([{"a": 1}], [0]) == 0 and client.dropped == 1
    with pytest.raises(MonitorUnavailableError):
        client.drift_json()
