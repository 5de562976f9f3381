"""THE seam between serving and the drift monitor — the only place the request path touches it.

Every answered request calls :meth:`MonitorHook.observe` with the raw rows it was given (named-column
input) and the predictions; ``GET /monitor/drift`` and ``GET /monitor/report`` call :meth:`drift` and
:meth:`report`. :func:`monitor_hook` returns a no-op hook when ``cfg.monitor.enabled`` is false or
``fabric.monitor`` is not installed, so serving never depends on the monitor being there.

``observe`` must never block or raise: it gathers rows for up to ``monitor.batch_interval_s`` (one actor
call per request would cost a cheap model most of its throughput), and the monitor client samples and sends
them fire-and-forget, dropping (and counting) samples when the monitor actor is slow or gone.
"""

from __future__ import annotations

import logging
import threading
import time
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
    """The hook over :class:`fabric.monitor.MonitorClient` (the monitor actor, found by name).

    Args:
        client: the monitor client (``submit(rows, predictions)``).
        batch_interval_s: longest a served row waits before it is sent; 0 sends every request's rows at once.
        batch_rows: rows gathered at most before they are sent.
    """

    def __init__(self, client: Any, batch_interval_s: float = 0.0, batch_rows: int = 512) -> None:
        self.client = client
        self.batch_interval_s = batch_interval_s
        self.batch_rows = batch_rows
        self._warned = False
        self._lock = threading.Lock()
        self._rows: list[Mapping[str, Any]] = []
        self._preds: list[Any] = []
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if batch_interval_s > 0:
            # sends what a quiet spell leaves gathered
            self._thread = threading.Thread(target=self._loop, name="fabric-monitor-hook", daemon=True)
            self._thread.start()

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        # Tensor input carries encoded features only; the monitor compares raw columns with its reference.
        if not rows:
            return
        if self.batch_interval_s <= 0:
            self._submit(rows, predictions)
            return
        with self._lock:
            if not self._rows:
                self._since = time.monotonic()
            self._rows.extend(rows)
            self._preds.extend(predictions)
            due = len(self._rows) >= self.batch_rows or time.monotonic() - self._since >= self.batch_interval_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Send the gathered rows now."""
        with self._lock:
            rows, preds = self._rows, self._preds
            self._rows, self._preds = [], []
        if rows:
            self._submit(rows, preds)

    def _loop(self) -> None:
        while not self._stop.wait(self.batch_interval_s):
            self.flush()

    def close(self) -> None:
        """Send what is gathered and stop the background sender."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _submit(self, rows: Sequence[Mapping[str, Any]], predictions: Sequence[Any]) -> None:
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
    m = cfg.monitor
    return ClientMonitor(MonitorClient(m), m.batch_interval_s, m.batch_rows)
