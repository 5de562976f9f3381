"""The drift-monitor seam: a no-op when monitoring is off, the monitor client otherwise, never failing a request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabric.config import load_config
from fabric.serve.monitor_hook import ClientMonitor, NoMonitor, monitor_hook
from fabric.serve.protocol import ProtocolError


def test_off_means_a_no_op_and_404_routes() -> None:
    hook = monitor_hook(load_config(None, ["monitor.enabled=false"]))
    assert isinstance(hook, NoMonitor)
    hook.observe("v1", [{"a": 1}], [0])
    with pytest.raises(ProtocolError) as info:
        asyncio.run(hook.drift())
    assert info.value.status == 404


def test_on_uses_the_monitor_client_and_503_without_an_actor() -> None:
    hook = monitor_hook(load_config())  # monitoring is on by default; no Ray, so no actor
    assert isinstance(hook, ClientMonitor)
    hook.observe("v1", [{"a": 1}], [0])  # gathered, then dropped and counted by the client, never raised
    hook.close()
    assert hook.client.dropped == 1
    for call in (hook.drift(), hook.report(), hook.reset()):
        with pytest.raises(ProtocolError) as info:
            asyncio.run(call)
        assert (info.value.status, info.value.type) == (503, "monitor_unavailable")


def test_observe_swallows_client_failures() -> None:
    class Broken:
        def submit(self, rows: Any, predictions: Any, version: str | None = None) -> int:
            raise RuntimeError("actor gone")

    hook = ClientMonitor(Broken())
    hook.observe("v1", [{"a": 1}], [0])
    hook.observe("v1", [{"a": 1}], [0])  # warned once, still no exception
    hook.observe("v1", None, [0])  # tensor input: nothing to hand over


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list, list]] = []
        self.versions: list[str | None] = []
        self.ranges: list[tuple[int, int, dict]] = []

    def submit(self, rows: Any, predictions: Any, version: str | None = None) -> int:
        self.calls.append((list(rows), list(predictions)))
        self.versions.append(version)
        return len(rows)

    def count_out_of_range(self, rows: int, flagged: int, features: dict) -> None:
        self.ranges.append((rows, flagged, features))


def test_rows_are_gathered_into_one_submission_per_interval_or_batch() -> None:
    client = Recorder()
    hook = ClientMonitor(client, batch_interval_s=3600, batch_rows=5)
    try:
        for i in range(4):
            hook.observe("v1", [{"a": i}], [i])
        assert client.calls == []  # neither the interval nor batch_rows reached
        hook.observe("v1", [{"a": 4}, {"a": 5}], [4, 5])
        assert client.calls == [([{"a": i} for i in range(6)], list(range(6)))]
        hook.observe("v1", [{"a": 6}], [6])
    finally:
        hook.close()  # sends the rest
    assert client.calls[-1] == ([{"a": 6}], [6]) and len(client.calls) == 2


def test_a_quiet_spell_still_sends_what_was_gathered() -> None:
    import time

    client = Recorder()
    hook = ClientMonitor(client, batch_interval_s=0.05, batch_rows=1000)
    try:
        hook.observe("v1", [{"a": 1}], [1])
        deadline = time.monotonic() + 10
        while not client.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.calls == [([{"a": 1}], [1])]
    finally:
        hook.close()


def test_versions_are_sent_apart_and_range_counts_summed() -> None:
    client = Recorder()
    hook = ClientMonitor(client, batch_interval_s=3600, batch_rows=1000)
    try:
        hook.observe("a", [{"x": 1}], [1])
        hook.observe("b", [{"x": 2}], [2])
        hook.observe("a", [{"x": 3}], [3])
        hook.observe_out_of_range("a", 4, 1, {"x": 1})
        hook.observe_out_of_range("b", 2, 2, {"x": 2, "y": 1})
    finally:
        hook.close()
    assert sorted(zip(client.versions, client.calls, strict=True)) == [
        ("a", ([{"x": 1}, {"x": 3}], [1, 3])),
        ("b", ([{"x": 2}], [2])),
    ]
    assert client.ranges == [(6, 3, {"x": 3, "y": 1})]


def test_models_predictions_on_the_reference_are_sent_when_the_monitor_lacks_them() -> None:
    import time

    import pandas as pd

    class Monitor(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[str, tuple] = {}

        def prediction_reference_needed(self, models: dict[str, str]) -> tuple[str, Any] | None:
            if all(self.refs.get(v, (None,))[0] == k for v, k in models.items()):
                return None
            return "fp", pd.DataFrame({"x": [1, 2, 3]})

        def set_prediction_reference(self, version: str, preds: Any, model: str, fingerprint: str) -> bool:
            self.refs[version] = (model, list(preds), fingerprint)
            return True

    client = Monitor()
    asked: list[list[str]] = []

    def predict(frame: pd.DataFrame, versions: list[str]) -> dict[str, list[int]]:
        asked.append(versions)
        return {v: [int(x) % 2 for x in frame["x"]] for v in versions}

    hook = ClientMonitor(client)
    hook.attach_models({"v1": "model-1"}, predict, interval_s=0.01)
    try:
        deadline = time.monotonic() + 10
        while not client.refs and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # more rounds: nothing is sent again once the monitor has them
    finally:
        hook.close()
    assert client.refs == {"v1": ("model-1", [1, 0, 1], "fp")}
    assert asked == [["v1"]]


def test_a_report_with_nothing_to_report_is_a_409() -> None:
    from fabric.errors import FabricError

    class Empty:
        async def areport_html(self, refresh: bool = False) -> str:
            raise FabricError("drift monitor m: nothing to report yet (insufficient_data: 3 rows in the window)")

    with pytest.raises(ProtocolError) as info:
        asyncio.run(ClientMonitor(Empty()).report())
    assert (info.value.status, info.value.type) == (409, "no_report") and "3 rows" in info.value.message
