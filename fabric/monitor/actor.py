"""The drift monitor as a named, restartable Ray actor: a thin shell around DriftMonitor.

The shell adds what needs Ray or real time: a background thread that computes on the schedule and
checkpoints, Prometheus metrics through ``ray.util.metrics``, and restoring from the checkpoint when Ray
restarts the actor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError
from fabric.monitor.monitor import DriftMonitor, reference_fingerprint

if TYPE_CHECKING:
    import pandas as pd
    from ray.actor import ActorHandle

    from fabric.config import MonitorConfig

log = logging.getLogger("fabric.monitor")

NAMESPACE = "fabric"
# Calls in flight when the actor dies are retried on the restarted actor (adds are then at-least-once).
MAX_TASK_RETRIES = 3
# add() must never wait behind a drift computation or an HTML report.
MAX_CONCURRENCY = 4


def _log_to_stderr() -> None:
    """Send fabric.monitor's INFO lines to the worker's stderr (Ray's log files, and the driver's console)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # not also fabric's stdout line


class MonitorMetrics:
    """The monitor's Prometheus metrics (``ray_`` is prefixed by Ray's exporter); all tagged ``monitor``."""

    def __init__(self, name: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"monitor": name}
        m = ("monitor",)
        self.drift_share = Gauge("fabric_monitor_drift_share", "Share of feature columns drifted", m)
        self.dataset_drift = Gauge("fabric_monitor_dataset_drift", "1 when drift share >= threshold", m)
        self.drift_detected = Gauge("fabric_monitor_drift_detected", "1 when dataset or prediction drift", m)
        self.feature_score = Gauge(
            "fabric_monitor_feature_drift_score",
            "Drift score of a feature (a p-value or a distance: see the test tag)",
            ("monitor", "feature", "test"),
        )
        self.feature_drifted = Gauge(
            "fabric_monitor_feature_drifted", "1 when the feature drifted", ("monitor", "feature")
        )
        self.prediction_score = Gauge(
            "fabric_monitor_prediction_drift_score",
            "Drift score of a version's predictions against its predictions on the reference",
            ("monitor", "version", "test"),
        )
        self.prediction_drifted = Gauge(
            "fabric_monitor_prediction_drifted", "1 when the version's predictions drifted", ("monitor", "version")
        )
        self.window_size = Gauge("fabric_monitor_window_size", "Rows in the rolling window", m)
        self.compute_seconds = Gauge("fabric_monitor_compute_seconds", "Seconds the last computation took", m)
        self.received = Counter("fabric_monitor_received_samples", "Rows received by the monitor", m)
        self.drift_events = Counter("fabric_monitor_drift_events", "Times drift started", m)
        self.out_of_range = Counter(
            "fabric_monitor_out_of_range_rows", "Served tensor rows with a feature outside the training range", m
        )

    def publish(self, result: dict[str, Any], started: bool) -> None:
        """Set the gauges from a drift result."""
        if result.get("status") != "ok":
            return
        t = self.tags
        self.drift_share.set(result["drift_share"], t)
        self.dataset_drift.set(float(result["dataset_drift"]), t)
        self.drift_detected.set(float(result["drift_detected"]), t)
        for feature, col in result["columns"].items():
            if col["score"] is not None:
                self.feature_score.set(col["score"], {**t, "feature": feature, "test": str(col["test"])})
            self.feature_drifted.set(float(col["drifted"]), {**t, "feature": feature})
        for version, pred in ((result.get("prediction") or {}).get("versions") or {}).items():
            if pred.get("score") is not None:
                self.prediction_score.set(pred["score"], {**t, "version": version, "test": str(pred["test"])})
            self.prediction_drifted.set(float(pred["drifted"]), {**t, "version": version})
        if "duration_s" in result:
            self.compute_seconds.set(result["duration_s"], t)
        if started:
            self.drift_events.inc(1.0, t)


class MonitorActor:
    """Holds one DriftMonitor; Ray runs it as a threaded, named, restartable actor (see ``start``).

    The constructor takes only small arguments: the reference arrives by ``set_reference`` and is
    checkpointed at once, so a restart never depends on a constructor argument in the object store (which
    dies with the process that started a detached actor). A restarted actor restores reference, window and
    counters from the checkpoint; without a checkpoint it waits for ``set_reference`` (results say
    ``no_reference``).

    Args:
        cfg: the monitor's settings.
        checkpoint_path: where state is checkpointed (absolute, or a pyarrow URI); None: no checkpoints.
        run_dir: the run's folder (retraining jobs get it as ``{run_dir}``).
    """

    def __init__(self, cfg: MonitorConfig, checkpoint_path: str | None = None, run_dir: str | None = None) -> None:
        _log_to_stderr()
        self.cfg = cfg
        self.checkpoint_path = checkpoint_path
        work_dir = str(Path(checkpoint_path).parent) if checkpoint_path and "://" not in checkpoint_path else None
        self._kwargs: dict[str, Any] = {"name": cfg.actor_name, "run_dir": run_dir, "work_dir": work_dir}
        state = DriftMonitor.read_state(checkpoint_path) if checkpoint_path else None
        self.monitor: DriftMonitor | None = DriftMonitor.from_state(cfg, state, **self._kwargs) if state else None
        self.restored = self.monitor is not None
        self.metrics = MonitorMetrics(cfg.actor_name)
        self._not_monitored = 0
        self._saved_marker: tuple[int, ...] | None = self._marker() if self.restored else None
        self._saved_at = 0.0
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drift-schedule", daemon=True)
        self._thread.start()
        if self.monitor is not None:
            log.info(
                "drift monitor %s restored from %s: %d reference rows, %d features, window %d/%d",
                cfg.actor_name,
                checkpoint_path,
                len(self.monitor.reference),
                len(self.monitor.features),
                self.monitor.window_size,
                cfg.window_size,
            )
        else:
            log.info("drift monitor %s started; waiting for its reference", cfg.actor_name)

    # ------------------------------------------------------------------ the schedule

    def _marker(self) -> tuple[int, ...] | None:
        m = self.monitor
        return (m.received, m.computations, m.dropped, m.tensor_rows) if m is not None else None

    def _loop(self) -> None:
        tick = min(1.0, self.cfg.interval_s / 2, self.cfg.checkpoint_interval_s / 2)
        while not self._stop.wait(tick):
            mon = self.monitor
            if mon is None:
                continue
            try:
                result = mon.maybe_compute()
                if result is not None:
                    self._published(result)
                self.metrics.window_size.set(mon.window_size, self.metrics.tags)
                if time.monotonic() - self._saved_at >= self.cfg.checkpoint_interval_s:
                    self._checkpoint_if_changed()
            except Exception:  # the schedule must survive one bad computation
                log.exception("drift monitor %s: scheduled work failed", self.cfg.actor_name)

    def _published(self, result: dict[str, Any]) -> dict[str, Any]:
        self.metrics.publish(result, bool(result.get("drift_started")))
        return result

    def _checkpoint_if_changed(self) -> bool:
        if not self.checkpoint_path or self._marker() == self._saved_marker:
            return False
        self.checkpoint()
        return True

    def _require(self) -> DriftMonitor:
        if self.monitor is None:
            name = self.cfg.actor_name
            raise FabricError(f"drift monitor {name} has no reference yet (fabric.monitor.run gives it one)")
        return self.monitor

    def _no_reference(self) -> dict[str, Any]:
        from fabric.monitor.stats import empty_result

        return empty_result("no_reference", 0, 0, monitor=self.stats())

    # ------------------------------------------------------------------ remote methods

    def set_reference(
        self,
        reference: pd.DataFrame,
        target: str | None = None,
        task: str | None = None,
        features: list[str] | None = None,
        categorical: list[str] | tuple[str, ...] = (),
    ) -> str:
        """Compare with ``reference`` from now on (the window is kept) and checkpoint; returns its fingerprint."""
        spec: dict[str, Any] = {"target": target, "task": task, "features": features, "categorical": categorical}
        if self.monitor is None:
            self.monitor = DriftMonitor(self.cfg, reference, **spec, **self._kwargs)
            if self._not_monitored:
                self.monitor.count_dropped(self._not_monitored)
                self._not_monitored = 0
        else:
            self.monitor.set_reference(reference, **spec)
        log.info(
            "drift monitor %s: reference of %d rows, %d features (%s)",
            self.cfg.actor_name,
            len(reference),
            len(self.monitor.features),
            ", ".join(f"{c}:{k}" for c, k in self.monitor.kinds.items()),
        )
        self._saved_marker = None
        self._checkpoint_if_changed()
        return self.monitor.fingerprint

    def add(
        self,
        rows: list[dict[str, Any]],
        predictions: list[Any] | None = None,
        dropped: int = 0,
        version: str | None = None,
    ) -> int:
        """Append rows to the window (see ``DriftMonitor.add``); without a reference they are counted as dropped."""
        if self.monitor is None:
            self._not_monitored += len(rows) + int(dropped)
            return 0
        n = self.monitor.add(rows, predictions, dropped=dropped, version=version)
        if n:
            self.metrics.received.inc(float(n), self.metrics.tags)
        return n

    def compute(self) -> dict[str, Any]:
        """Compute drift now and return the result (status ``no_reference`` before ``set_reference``)."""
        if self.monitor is None:
            return self._no_reference()
        return self._published(self.monitor.compute())

    def drift(self, refresh: bool = False) -> dict[str, Any]:
        """The last result with its ``age_s``; computed now when ``refresh`` or when there is none yet."""
        if self.monitor is None:
            return self._no_reference()
        before = self.monitor.last_result
        answer = self.monitor.answer(refresh)
        if self.monitor.last_result is not before:
            self._published(self.monitor.last_result)
        return answer

    def report_html(self, refresh: bool = False) -> str:
        """The HTML report of the last result (``refresh``: of one computed now); see ``DriftMonitor.report_html``."""
        mon = self._require()
        before = mon.last_result
        html = mon.report_html(refresh=refresh)
        if mon.last_result is not before and mon.last_result is not None:
            self._published(mon.last_result)
        return html

    def reset(self) -> dict[str, Any]:
        """Empty the window and the last result, and checkpoint at once (a restart does not bring them back)."""
        mon = self._require()
        dropped = mon.reset()
        self._saved_marker = None
        self.checkpoint()
        self.metrics.window_size.set(0, self.metrics.tags)
        return {"reset": True, "rows_dropped": dropped, "monitor": mon.counters()}

    def count_out_of_range(self, rows: int, flagged: int, features: dict[str, int]) -> None:
        """Count served tensor rows and those outside the training range (see ``DriftMonitor.count_out_of_range``)."""
        if self.monitor is not None:
            self.monitor.count_out_of_range(rows, flagged, features)
        if flagged:
            self.metrics.out_of_range.inc(float(flagged), self.metrics.tags)

    def missing_prediction_references(self, models: dict[str, str]) -> list[str]:
        """Versions (of version -> model key) whose predictions on the reference the monitor lacks."""
        return self.monitor.missing_prediction_references(models) if self.monitor is not None else []

    def reference_inputs(self) -> tuple[str, pd.DataFrame]:
        """The reference's fingerprint and input columns (a replica predicts on them)."""
        return self._require().reference_inputs()

    def set_prediction_reference(self, version: str, predictions: list[Any], model: str, fingerprint: str) -> bool:
        """A version's predictions on the reference sample (see ``DriftMonitor.set_prediction_reference``)."""
        ok = self._require().set_prediction_reference(version, predictions, model, fingerprint)
        if ok:
            self._saved_marker = None
            self._checkpoint_if_changed()
        return ok

    def stats(self) -> dict[str, Any]:
        """Counters, window size, whether restored from a checkpoint, checkpoints written, reference, pid."""
        saved = self._saved_marker
        base = self.monitor.counters() if self.monitor is not None else {"name": self.cfg.actor_name}
        return {
            **base,
            "restored": self.restored,
            "checkpoints": self.checkpoints,
            "checkpoint_path": self.checkpoint_path,
            "checkpointed_received": saved[0] if saved else None,
            "reference_fingerprint": self.monitor.fingerprint if self.monitor is not None else None,
            "pid": os.getpid(),
        }

    def count_dropped(self, n: int) -> None:
        """Count samples a client dropped."""
        if self.monitor is None:
            self._not_monitored += int(n)
        else:
            self.monitor.count_dropped(n)

    def checkpoint(self) -> str | None:
        """Write the checkpoint now; returns its path (None when checkpoints are off or there is no reference)."""
        if not self.checkpoint_path or self.monitor is None:
            return None
        marker = self._marker()
        self.monitor.save(self.checkpoint_path)
        self._saved_marker = marker
        self._saved_at = time.monotonic()
        self.checkpoints += 1
        return self.checkpoint_path

    def ping(self) -> bool:
        """True (the actor is up)."""
        return True

    def shutdown(self) -> str | None:
        """Stop the schedule and write a last checkpoint (before the actor is killed); returns its path."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.checkpoint()


# --------------------------------------------------------------------------- starting and finding it


def get_actor(name: str) -> ActorHandle | None:
    """The running monitor actor called ``name`` in the ``fabric`` namespace, or None."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def start(
    cfg: MonitorConfig,
    reference: pd.DataFrame | None,
    *,
    target: str | None = None,
    task: str | None = None,
    features: list[str] | None = None,
    categorical: list[str] | tuple[str, ...] = (),
    checkpoint_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    timeout_s: float = 120.0,
) -> ActorHandle:
    """Start the named monitor actor (or get the running one) and wait until it answers.

    Ray must be connected. A running monitor with another reference is switched to ``reference`` (its
    window and settings stay). Local paths are made absolute here, because the actor's working directory
    is not the caller's.
    """
    import ray

    def absolute(p: str | Path | None) -> str | None:
        if p is None:
            return None
        return str(p) if "://" in str(p) else str(Path(p).expanduser().resolve())

    actor_cls = ray.remote(MonitorActor)
    handle = actor_cls.options(  # type: ignore[attr-defined]
        name=cfg.actor_name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached" if cfg.detached else None,
        max_restarts=-1,
        max_task_retries=MAX_TASK_RETRIES,
        max_concurrency=MAX_CONCURRENCY,
    ).remote(cfg, absolute(checkpoint_path), absolute(run_dir))
    try:
        running = ray.get(handle.stats.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise FabricError(f"drift monitor {cfg.actor_name} did not start within {timeout_s:.0f}s") from None
    if reference is not None and running["reference_fingerprint"] != reference_fingerprint(reference):
        # A new actor, or one of an earlier run still up (it is detached): compare with this reference from now
        # on. A running actor keeps its other settings; `fabric.monitor.stop` first to change them.
        if running["reference_fingerprint"] is not None:
            log.info("drift monitor %s: already running with another reference; replacing it", cfg.actor_name)
        spec = (target, task, features, list(categorical))
        ray.get(handle.set_reference.remote(reference, *spec), timeout=timeout_s)
    return handle


def stop(name: str) -> bool:
    """Kill the monitor actor called ``name`` for good; False when none was running."""
    import ray

    handle = get_actor(name)
    if handle is None:
        return False
    try:
        ray.get(handle.shutdown.remote(), timeout=30)  # a last checkpoint: `run` later carries on from it
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        log.warning("drift monitor %s: no last checkpoint before stopping: %s", name, e)
    ray.kill(handle, no_restart=True)
    return True
