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
    hook.observe("v1", [{"a": 1}], [0])  # dropped and counted by the client, never raised
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
