"""THE seam between serving and the drift monitor — the only place the request path touches it.

Every answered request calls :meth:`MonitorHook.observe` with the raw rows it was given (named-column
input) and the predictions (tensor input: :meth:`MonitorHook.observe_out_of_range`); ``GET /monitor/drift``,
``GET /monitor/report`` and ``POST /monitor/reset`` call :meth:`drift`, :meth:`report` and :meth:`reset`. :func:`monitor_hook` returns a no-op hook when ``cfg.monitor.enabled`` is false or
``fabric.monitor`` is not installed, so serving never depends on the monitor being there.

``observe`` must never block or raise: it gathers rows for up to ``monitor.batch_interval_s`` (one actor
call per request would cost a cheap model most of its throughput), and the monitor client samples and sends
them fire-and-forget, dropping (and counting) samples when the monitor actor is slow or gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fabric.serve.protocol import ProtocolError

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

log = logging.getLogger("fabric.serve")


class MonitorHook(Protocol):
    """What a replica hands the drift monitor, and how the HTTP layer reads it."""

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        """Hand over served rows (raw feature values; None for tensor input) and their predictions."""

    def observe_out_of_range(self, version: str, rows: int, flagged: int, features: Mapping[str, int]) -> None:
        """Count served tensor rows, and those with a feature outside the range seen in training."""

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        """The drift result as JSON (raises ProtocolError 404/503 when there is none to give)."""

    async def report(self, refresh: bool = False) -> str:
        """The HTML drift report of the same result ``drift`` gives."""

    async def reset(self) -> dict[str, Any]:
        """Empty the monitor's window and last result."""


class NoMonitor:
    """The hook when monitoring is off: observes nothing, and the monitor routes answer 404."""

    def __init__(self, reason: str = "the drift monitor is disabled (monitor.enabled=false)") -> None:
        self.reason = reason

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        return None

    def observe_out_of_range(self, version: str, rows: int, flagged: int, features: Mapping[str, int]) -> None:
        return None

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        raise ProtocolError(404, self.reason, "monitor_disabled")

    async def report(self, refresh: bool = False) -> str:
        raise ProtocolError(404, self.reason, "monitor_disabled")

    async def reset(self) -> dict[str, Any]:
        raise ProtocolError(404, self.reason, "monitor_disabled")


# version -> model key; and reference inputs -> {version: predictions}
ReferencePredictor = Callable[[Any, Sequence[str]], Mapping[str, Sequence[Any]]]


class ClientMonitor:
    """The hook over :class:`fabric.monitor.MonitorClient` (the monitor actor, found by name).

    Args:
        client: the monitor client (``submit(rows, predictions, version)``).
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
        self._versions: list[str] = []
        self._since = 0.0
        self._range = [0, 0, Counter()]  # tensor rows, flagged rows, feature -> rows (not sent yet)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._primer: threading.Thread | None = None
        if batch_interval_s > 0:
            # sends what a quiet spell leaves gathered
            self._thread = threading.Thread(target=self._loop, name="fabric-monitor-hook", daemon=True)
            self._thread.start()

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        # Tensor input carries encoded features only; the monitor compares raw columns with its reference.
        if not rows:
            return
        if self.batch_interval_s <= 0:
            self._submit(rows, predictions, [version] * len(rows))
            return
        with self._lock:
            if not self._rows:
                self._since = time.monotonic()
            self._rows.extend(rows)
            self._preds.extend(predictions)
            self._versions.extend([version] * len(rows))
            due = len(self._rows) >= self.batch_rows or time.monotonic() - self._since >= self.batch_interval_s
        if due:
            self.flush()

    def observe_out_of_range(self, version: str, rows: int, flagged: int, features: Mapping[str, int]) -> None:
        with self._lock:
            self._range[0] += rows
            self._range[1] += flagged
            self._range[2].update(features)
        if self.batch_interval_s <= 0:
            self.flush()

    def flush(self) -> None:
        """Send the gathered rows (one submission per version) and tensor-range counts now."""
        with self._lock:
            rows, preds, versions = self._rows, self._preds, self._versions
            self._rows, self._preds, self._versions = [], [], []
            tensor_rows, flagged, features = self._range
            self._range = [0, 0, Counter()]
        if rows:
            self._submit(rows, preds, versions)
        if tensor_rows:
            try:
                self.client.count_out_of_range(tensor_rows, flagged, dict(features))
            except Exception as e:  # the monitor must never fail a request
                self._warn(e)

    def _loop(self) -> None:
        while not self._stop.wait(self.batch_interval_s):
            self.flush()

    def close(self) -> None:
        """Send what is gathered and stop the background threads."""
        self._stop.set()
        for thread in (self._thread, self._primer):
            if thread is not None:
                thread.join(timeout=5)
        self.flush()

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            log.warning("drift monitor submit failed (further failures not logged): %s", e)
            self._warned = True

    def _submit(self, rows: Sequence[Mapping[str, Any]], predictions: Sequence[Any], versions: Sequence[str]) -> None:
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(versions):
            groups.setdefault(v, []).append(i)
        for version, idx in groups.items():
            part = (rows, predictions) if len(groups) == 1 else ([rows[i] for i in idx], [predictions[i] for i in idx])
            try:
                self.client.submit(part[0], part[1], version)
            except Exception as e:  # the monitor must never fail a request
                self._warn(e)

    # ------------------------------------------------------------------ the models' predictions on the reference

    def attach_models(self, models: Mapping[str, str], predict: ReferencePredictor, interval_s: float = 10.0) -> None:
        """Keep the monitor supplied with each version's predictions on its reference sample.

        A background thread asks the monitor every ``interval_s`` whether it lacks the predictions of one of
        ``models`` (version -> a key of the model behind it) on its current reference (it has none yet, its
        reference changed, or a version's model did); then it reads the reference's input columns, runs
        ``predict(frame, versions)`` and sends the result. Served predictions are compared with these.
        """
        self._primer = threading.Thread(
            target=self._prime_loop, args=(dict(models), predict, interval_s), name="fabric-monitor-prime", daemon=True
        )
        self._primer.start()

    def _prime_loop(self, models: dict[str, str], predict: ReferencePredictor, interval_s: float) -> None:
        warned: set[str] = set()
        while True:
            try:
                needed = self.client.prediction_reference_needed(models)
            except Exception as e:  # retried on the next round; serving never depends on it
                needed = None
                if "" not in warned:
                    log.warning("drift monitor: cannot ask for predictions on the reference (retrying): %s", e)
                    warned.add("")
            if needed is not None:
                fingerprint, frame = needed
                for version, key in models.items():  # one version failing does not keep the others back
                    try:
                        for v, preds in predict(frame, [version]).items():
                            self.client.set_prediction_reference(v, preds, key, fingerprint)
                        log.info("drift monitor: sent version %s's predictions on the reference sample", version)
                    except Exception as e:
                        if version not in warned:
                            log.warning(
                                "drift monitor: version %s's predictions on the reference not sent (retrying): %s",
                                version,
                                e,
                            )
                            warned.add(version)
            if self._stop.wait(interval_s):
                return

    # ------------------------------------------------------------------ reading it

    async def drift(self, refresh: bool = False) -> dict[str, Any]:
        from fabric.monitor import MonitorUnavailableError

        try:
            return await self.client.adrift_json(refresh)
        except MonitorUnavailableError as e:
            raise ProtocolError(503, str(e), "monitor_unavailable") from None

    async def report(self, refresh: bool = False) -> str:
        from fabric.errors import FabricError
        from fabric.monitor import MonitorUnavailableError

        try:
            return await self.client.areport_html(refresh)
        except MonitorUnavailableError as e:
            raise ProtocolError(503, str(e), "monitor_unavailable") from None
        except FabricError as e:  # raised in the actor: nothing to report yet
            raise ProtocolError(409, str(e).strip().splitlines()[-1], "no_report") from None

    async def reset(self) -> dict[str, Any]:
        from fabric.monitor import MonitorUnavailableError

        try:
            return await self.client.areset()
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
