"""THE seam between serving and the drift monitor — the only place the request path touches it.

Every answered request calls :meth:`MonitorHook.observe` with the raw rows it was given (named-column
input) and the predictions; ``GET /monitor/drift`` and ``GET /monitor/report`` call :meth:`drift` and
:meth:`report`. :func:`monitor_hook` returns a no-op hook when ``cfg.monitor.enabled`` is false or
``fabric.monitor`` is not installed, so serving never depends on the monitor being there.

``observe`` must never block or raise: the monitor client samples and sends fire-and-forget, dropping
(and counting) samples when the monitor actor is slow or gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fabric.serve.protocol import ProtocolError

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

log = logging.getLogger("fabric.serve")


class MonitorHook(Protocol):
    """What a replica hands the drift monitor, and how the HTTP layer reads it."""

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        """Hand over served rows (raw feature values; None for tensor input) and their predictions."""

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        """The drift result as JSON (raises ProtocolError 404/503 when there is none to give)."""

    async def report(self) -> str:
        """The HTML drift report."""


class NoMonitor:
    """The hook when monitoring is off: observes nothing, and the monitor routes answer 404."""

    def __init__(self, reason: str = "the drift monitor is disabled (monitor.enabled=false)") -> None:
        self.reason = reason

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        return None

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        raise ProtocolError(404, self.reason, "monitor_disabled")

    async def report(self) -> str:
        raise ProtocolError(404, self.reason, "monitor_disabled")


class ClientMonitor:
    """The hook over :class:`fabric.monitor.MonitorClient` (the monitor actor, found by name)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._warned = False

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        # Tensor input carries encoded features only; the monitor compares raw columns with its reference.
        if not rows:
            return
        try:
            self.client.submit(rows, predictions)
        except Exception as e:  # the monitor must never fail a request
            if not self._warned:
                log.warning("drift monitor submit failed (further failures not logged): %s", e)
                self._warned = True

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        from fabric.monitor import MonitorUnavailableError

        try:
            return await self.client.adrift_json(refresh)
        except MonitorUnavailableError as e:
            raise ProtocolError(503, str(e), "monitor_unavailable") from None

    async def report(self) -> str:
        from fabric.monitor import MonitorUnavailableError

        try:
            return await self.client.areport_html()
        except MonitorUnavailableError as e:
            raise ProtocolError(503, str(e), "monitor_unavailable") from None


def monitor_hook(cfg: PipelineConfig) -> MonitorHook:
    """The hook for a replica: the monitor client when enabled and installed, else a no-op."""
    if not cfg.monitor.enabled:
        return NoMonitor()
    try:
        from fabric.monitor import MonitorClient
    except ImportError as e:
        return NoMonitor(f"the drift monitor is not available here ({e})")
    return ClientMonitor(MonitorClient(cfg.monitor))
