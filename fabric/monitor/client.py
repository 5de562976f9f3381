"""What a serving replica uses to feed the drift monitor and read its results.

``submit`` never waits on the actor: it samples, then sends with a fire-and-forget ``.remote()`` while fewer
than ``queue_size`` submissions are in flight; past that (the actor is slow, restarting or gone) samples are
dropped and counted, in a Prometheus counter at once and in the actor's count with the next submission that
goes through.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fabric.errors import ClusterError, DataValidationError

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from fabric.config import MonitorConfig


class MonitorUnavailableError(ClusterError):
    """The drift-monitor actor is not running (or Ray is not connected); an HTTP layer answers 503."""


class _ClientMetrics:
    def __init__(self, name: str) -> None:
        from ray.util.metrics import Counter

        self.tags = {"monitor": name}
        self.dropped = Counter(
            "fabric_monitor_dropped_samples",
            "Samples a replica dropped instead of sending (reason: backpressure or unavailable)",
            ("monitor", "reason"),
        )
        self.sent = Counter("fabric_monitor_submitted_samples", "Samples replicas sent to the monitor", ("monitor",))


class MonitorClient:
    """A replica's handle on the drift monitor, found by name in Ray's ``fabric`` namespace.

    Cheap to build; looks the actor up once at construction and, while it is missing, at most once every
    ``lookup_interval_s`` (a lookup is the only call here that waits on Ray).

    Args:
        cfg: the monitor's settings (``actor_name``, ``sample_rate``, ``queue_size``).
        name: the actor's name (default ``cfg.actor_name``).
        sample_rate: share of rows sent (default ``cfg.sample_rate``).
        max_in_flight: submissions in flight before dropping (default ``cfg.queue_size``).
        seed: seeds the sampling (tests).
        lookup_interval_s: least seconds between two lookups of a missing actor.
    """

    def __init__(
        self,
        cfg: MonitorConfig | None = None,
        *,
        name: str | None = None,
        sample_rate: float | None = None,
        max_in_flight: int | None = None,
        seed: int | None = None,
        lookup_interval_s: float = 10.0,
    ) -> None:
        if cfg is None:
            from fabric.config import MonitorConfig

            cfg = MonitorConfig()
        self.name = name or cfg.actor_name
        self.sample_rate = cfg.sample_rate if sample_rate is None else sample_rate
        self.max_in_flight = cfg.queue_size if max_in_flight is None else max_in_flight
        self.lookup_interval_s = lookup_interval_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._handle: ActorHandle | None = None
        self._looked_up_at = -math.inf
        self._metrics: _ClientMetrics | None = None
        self.in_flight = 0
        """Submissions sent and not yet acknowledged."""
        self.sent = 0
        """Rows sent to the actor."""
        self.dropped = 0
        """Rows dropped here (back-pressure or no actor); sampled-out rows are not counted."""
        self.failed = 0
        """Rows sent whose submission failed (the actor died for good)."""
        self._unreported = 0
        self._actor()

    # ------------------------------------------------------------------ the actor

    def _actor(self) -> ActorHandle | None:
        if self._handle is not None:
            return self._handle
        now = time.monotonic()
        if now - self._looked_up_at < self.lookup_interval_s:
            return None
        self._looked_up_at = now
        import ray

        if not ray.is_initialized():
            return None
        from fabric.monitor.actor import get_actor

        if self._metrics is None:
            try:
                self._metrics = _ClientMetrics(self.name)
            except Exception:  # metrics are best effort
                self._metrics = None
        self._handle = get_actor(self.name)
        return self._handle

    def _require(self) -> ActorHandle:
        handle = self._actor()
        if handle is None:
            raise MonitorUnavailableError(f"the drift monitor {self.name!r} is not running in namespace 'fabric'")
        return handle

    # ------------------------------------------------------------------ feeding it

    def sample(self, rows: Sequence[Any], predictions: Sequence[Any] | None) -> tuple[list[Any], list[Any] | None]:
        """Keep each row (and its prediction) with probability ``sample_rate``."""
        if self.sample_rate >= 1.0:
            return list(rows), (list(predictions) if predictions is not None else None)
        keep = [i for i in range(len(rows)) if self._rng.random() < self.sample_rate]
        return [rows[i] for i in keep], ([predictions[i] for i in keep] if predictions is not None else None)

    def _drop(self, n: int, reason: str) -> None:
        with self._lock:
            self.dropped += n
            self._unreported += n
        if self._metrics is not None:
            self._metrics.dropped.inc(float(n), {**self._metrics.tags, "reason": reason})

    def submit(
        self,
        rows: Sequence[Mapping[str, Any]] | Any,
        predictions: Sequence[Any] | None = None,
        version: str | None = None,
    ) -> int:
        """Hand served rows and their predictions to the monitor without waiting for it.

        Args:
            rows: one mapping of raw feature values per served row (the columns of the reference sample), or
                a pandas DataFrame of them.
            predictions: one prediction per row: a class, a value, or class scores (their argmax is taken);
                a list or a numpy array.
            version: the model version that made the predictions (compared with its own predictions on the
                reference sample).

        Returns:
            Rows sent (after sampling); 0 when dropped under back-pressure or with no monitor running.

        Raises:
            DataValidationError: ``rows`` and ``predictions`` differ in length (a bug in the caller).
        """
        if hasattr(rows, "to_dict"):  # a DataFrame
            rows = rows.to_dict("records")
        if predictions is not None and len(predictions) != len(rows):
            raise DataValidationError(f"{len(rows)} rows but {len(predictions)} predictions", rows=len(rows))
        rows_s, preds_s = self.sample(rows, predictions)
        if preds_s is not None:
            preds_s = [p.tolist() if hasattr(p, "tolist") else p for p in preds_s]  # numpy: plain Python
        n = len(rows_s)
        if n == 0:
            return 0
        handle = self._actor()
        if handle is None:
            self._drop(n, "unavailable")
            return 0
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                full = True
            else:
                full = False
                self.in_flight += 1
                report, self._unreported = self._unreported, 0
        if full:
            self._drop(n, "backpressure")
            return 0
        try:
            ref = handle.add.remote(rows_s, preds_s, report, version)
            ref.future().add_done_callback(self._done)
        except Exception:  # never let the monitor fail a request
            with self._lock:
                self.in_flight -= 1
                self._unreported += report
            self._drop(n, "unavailable")
            return 0
        with self._lock:
            self.sent += n
        if self._metrics is not None:
            self._metrics.sent.inc(float(n), self._metrics.tags)
        return n

    def _done(self, fut: Any) -> None:
        exc = fut.exception()
        with self._lock:
            self.in_flight -= 1
            if exc is not None:
                self.failed += 1
        if exc is not None:
            from ray.exceptions import RayActorError

            if isinstance(exc, RayActorError):
                self._handle = None  # gone for good (retries exhausted): look it up again later

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until nothing is in flight (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------ reading results (HTTP handlers)

    def count_out_of_range(self, rows: int, flagged: int, features: Mapping[str, int]) -> None:
        """Tell the monitor of served tensor rows and those outside the training range (fire-and-forget)."""
        handle = self._actor()
        if handle is None:
            return
        try:
            handle.count_out_of_range.remote(int(rows), int(flagged), dict(features))
        except Exception:  # never let the monitor fail a request
            return

    def prediction_reference_needed(self, models: Mapping[str, str], timeout_s: float = 30.0) -> tuple[str, Any] | None:
        """The reference's fingerprint and input frame when the monitor lacks predictions of one of ``models``
        (version -> model key) on it; None when it has them all, or there is no monitor."""
        import ray

        handle = self._actor()
        if handle is None or not ray.get(handle.missing_prediction_references.remote(dict(models)), timeout=timeout_s):
            return None
        return ray.get(handle.reference_inputs.remote(), timeout=timeout_s)

    def set_prediction_reference(
        self, version: str, predictions: Sequence[Any], model: str, fingerprint: str, timeout_s: float = 60.0
    ) -> bool:
        """Hand the monitor a version's predictions on its reference (see ``DriftMonitor.set_prediction_reference``)."""
        import ray

        preds = [p.tolist() if hasattr(p, "tolist") else p for p in predictions]
        return ray.get(
            self._require().set_prediction_reference.remote(version, preds, model, fingerprint), timeout=timeout_s
        )

    def drift_json(self, refresh: bool = False, timeout_s: float = 60.0) -> dict[str, Any]:
        """The drift result (GET /monitor/drift): the last one, or computed now when ``refresh``.

        It carries ``computed_at``/``computed_at_utc``, ``age_s`` and ``window_size`` (rows compared).

        Raises:
            MonitorUnavailableError: no monitor running.
        """
        import ray

        return ray.get(self._require().drift.remote(refresh), timeout=timeout_s)

    def report_html(self, refresh: bool = False, timeout_s: float = 120.0) -> str:
        """The HTML drift report (GET /monitor/report) of the last result (``refresh``: of one computed now)."""
        import ray

        return ray.get(self._require().report_html.remote(refresh), timeout=timeout_s)

    def reset(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Empty the monitor's window and last result (POST /monitor/reset, `fabric monitor reset`)."""
        import ray

        return ray.get(self._require().reset.remote(), timeout=timeout_s)

    async def adrift_json(self, refresh: bool = False) -> dict[str, Any]:
        """``drift_json`` for async handlers (awaits the actor instead of blocking the event loop)."""
        return await self._require().drift.remote(refresh)

    async def areport_html(self, refresh: bool = False) -> str:
        """``report_html`` for async handlers."""
        return await self._require().report_html.remote(refresh)

    async def areset(self) -> dict[str, Any]:
        """``reset`` for async handlers."""
        return await self._require().reset.remote()

    def stats(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The actor's counters, plus this client's ``sent``/``dropped``/``in_flight`` under ``"client"``."""
        import ray

        out = ray.get(self._require().stats.remote(), timeout=timeout_s)
        out["client"] = {"sent": self.sent, "dropped": self.dropped, "failed": self.failed, "in_flight": self.in_flight}
        return out
