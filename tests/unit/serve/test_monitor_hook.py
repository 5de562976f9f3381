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
    for call in (hook.drift(), hook.report()):
        with pytest.raises(ProtocolError) as info:
            asyncio.run(call)
        assert (info.value.status, info.value.type) == (503, "monitor_unavailable")


def test_observe_swallows_client_failures() -> None:
    class Broken:
        def submit(self, rows: Any, predictions: Any) -> int:
            raise RuntimeError("actor gone")

    hook = ClientMonitor(Broken())
    hook.observe("v1", [{"a": 1}], [0])
    hook.observe("v1", [{"a": 1}], [0])  # warned once, still no exception
    hook.observe("v1", None, [0])  # tensor input: nothing to hand over


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list, list]] = []

    def submit(self, rows: Any, predictions: Any) -> int:
        self.calls.append((list(rows), list(predictions)))
        return len(rows)


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
