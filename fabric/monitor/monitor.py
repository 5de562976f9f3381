"""DriftMonitor: the rolling window, the schedule, the drift callbacks and the checkpoint, without Ray.

The Ray actor in ``actor.py`` only holds one of these; everything here runs (and is unit-tested) in a plain
process with an injected clock.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fabric.errors import DataValidationError, FabricError
from fabric.monitor import stats

if TYPE_CHECKING:
    import pandas as pd

    from fabric.config import MonitorConfig, PipelineConfig

log = logging.getLogger("fabric.monitor")

STATE_VERSION = 1
Task = Literal["classification", "regression"]
Clock = Callable[[], float]
JobClientFactory = Callable[[str | None], Any]


def reference_fingerprint(reference: pd.DataFrame) -> str:
    """A short hash of a reference frame's columns and values (is this the same reference?)."""
    import pandas as pd

    h = hashlib.sha256(",".join(map(str, reference.columns)).encode())
    h.update(pd.util.hash_pandas_object(reference.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- files (local paths or URIs)


def _filesystem(path: str) -> tuple[Any, str] | None:
    if "://" not in path:
        return None
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (a temp file renamed over) to a local path, or to a pyarrow URI."""
    path = str(path)
    fs = _filesystem(path)
    if fs is not None:
        filesystem, inner = fs
        filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(inner) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def read_bytes(path: str | Path) -> bytes | None:
    """The bytes at a local path or a pyarrow URI, or None when there is nothing there."""
    path = str(path)
    fs = _filesystem(path)
    if fs is not None:
        import pyarrow.fs

        filesystem, inner = fs
        if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.File:
            return None
        with filesystem.open_input_stream(inner) as f:
            return f.read()
    p = Path(path)
    return p.read_bytes() if p.is_file() else None


def load_reference(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Ingestion's reference sample and meta.json from ``<run_dir>/data``.

    Raises:
        FabricError: when the ingest stage has not written them.
    """
    import pandas as pd

    data = Path(run_dir) / "data"
    ref_path = data / "reference.parquet"
    if not ref_path.is_file():
        raise FabricError(f"no reference sample at {ref_path}: run the ingest stage first (fabric.data.run)")
    meta_path = data / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return pd.read_parquet(ref_path), meta


def reference_spec(cfg: PipelineConfig, reference: pd.DataFrame, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``target``, ``task``, ``features`` and ``categorical`` of a reference, from ingestion's meta.json."""
    target = meta.get("target") or (cfg.data.target if cfg.data.target in reference.columns else None)
    features = [c for c in meta.get("input_columns") or [] if c in reference.columns] or None
    return {
        "target": target,
        "task": meta.get("task") or cfg.data.task,
        "features": features,
        "categorical": [c for c in meta.get("categorical") or cfg.data.categorical if c in reference.columns],
    }


# --------------------------------------------------------------------------- the monitor


class DriftMonitor:
    """A rolling window of served rows and predictions, compared with a reference sample.

    Thread-safe: ``add`` may run while ``compute`` works on a copy of the window.

    Args:
        cfg: the monitor's settings.
        reference: the reference sample: raw feature columns, plus the target and/or prediction column.
        target: the reference's label column (not a feature; the prediction's reference when the sample has
            no prediction column).
        task: ``classification`` (the prediction is categorical) or ``regression`` (numerical); None infers
            it from the prediction's reference column.
        features: the raw feature columns (ingestion's ``input_columns``); None: every column of the
            reference but the target and the prediction.
        categorical: columns compared as categories whatever their dtype (ingestion's ``categorical``, e.g.
            integer codes with many values); the others are typed as Evidently infers them.
        column_types: each feature's type as inferred before (``"num"``, ``"cat"`` or a skipped type), from a
            checkpoint: restoring then needs no inference, nor Evidently's import, until the next computation.
        clock: seconds, wall time; injected so tests drive the schedule.
        name: named in log lines and webhook bodies.
        work_dir: where windows for retraining jobs are written (a local path or a pyarrow URI).
        run_dir: ``{run_dir}`` of the retraining entrypoint.
        job_client_factory: ``address -> JobSubmissionClient``; default ``fabric.runtime.job_client``.
    """

    def __init__(
        self,
        cfg: MonitorConfig,
        reference: pd.DataFrame,
        *,
        target: str | None = None,
        task: Task | None = None,
        features: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
        column_types: Mapping[str, str] | None = None,
        clock: Clock = time.time,
        name: str | None = None,
        work_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
        job_client_factory: JobClientFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.name = name or cfg.actor_name
        self.work_dir = str(work_dir) if work_dir is not None else None
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.job_client_factory = job_client_factory
        self.options = stats.DriftOptions.from_config(cfg)
        self._lock = threading.RLock()
        self._window: deque[tuple[dict[str, Any], Any]] = deque(maxlen=cfg.window_size)
        self.received = 0
        self.dropped = 0
        self.computations = 0
        self.drift_events = 0
        self.last_result: dict[str, Any] | None = None
        self.last_compute_at: float | None = None
        self.last_retrain_at: float | None = None
        self.last_retrain_job: str | None = None
        self.drift_active = False
        self._next_at = clock() + cfg.interval_s
        self._last_frame: pd.DataFrame | None = None
        self._set_reference(reference, target, task, features, categorical, column_types)

    # ------------------------------------------------------------------ reference

    def _set_reference(
        self,
        reference: pd.DataFrame,
        target: str | None,
        task: Task | None,
        features: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
        column_types: Mapping[str, str] | None = None,
    ) -> None:
        pred = self.cfg.prediction_column
        if target is not None and target not in reference.columns:
            raise DataValidationError(f"target column {target!r} is not in the reference sample", column=target)
        missing = [c for c in features or () if c not in reference.columns]
        if missing:
            raise DataValidationError(f"feature columns {missing} are not in the reference sample", column=missing[0])
        cols = [c for c in (features or reference.columns) if c not in (target, pred)]
        if column_types is not None:
            kinds = {c: t for c, t in column_types.items() if t in ("num", "cat")}  # type: ignore[misc]
            skipped = {c: t for c, t in column_types.items() if t not in ("num", "cat")}
        else:
            kinds, skipped = stats.infer_kinds(reference, cols)
            for col in categorical:
                if col in cols:
                    kinds[col] = "cat"
                    skipped.pop(col, None)
        kinds = {c: kinds[c] for c in cols if c in kinds}  # reference order
        pred_ref = pred if pred in reference.columns else target
        if task is None and pred_ref is not None:
            kind = stats.infer_kinds(reference, [pred_ref])[0].get(pred_ref, "cat")
            task = "classification" if kind == "cat" else "regression"
        with self._lock:
            self.reference = reference.reset_index(drop=True)
            self.target = target
            self.task = task
            self.spec = {"target": target, "task": task, "features": list(features) if features else None,
                         "categorical": list(categorical)}  # fmt: skip
            self.kinds = kinds
            self.skipped = skipped
            self.prediction_reference = pred_ref
            self.fingerprint = reference_fingerprint(reference)

    def set_reference(
        self,
        reference: pd.DataFrame,
        target: str | None = None,
        task: Task | None = None,
        features: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
    ) -> None:
        """Compare with a new reference from now on (after retraining).

        The window and counters are kept; the last result and the drift episode, which were against the old
        reference, are cleared.
        """
        old = self.fingerprint
        self._set_reference(reference, target, task, features, categorical)
        if self.fingerprint != old:
            with self._lock:
                self.last_result = None
                self.drift_active = False
                self._last_frame = None

    @property
    def features(self) -> list[str]:
        """The feature columns compared, in reference order."""
        return list(self.kinds)

    # ------------------------------------------------------------------ the window

    def add(
        self, rows: Sequence[Mapping[str, Any]], predictions: Sequence[Any] | None = None, *, dropped: int = 0
    ) -> int:
        """Append served rows (and their predictions) to the window; the oldest fall out past ``window_size``.

        Args:
            rows: one mapping of raw feature values per served row.
            predictions: one prediction per row (a scalar, or class scores whose argmax is taken), or None.
            dropped: samples the sender dropped under back-pressure since its last call (counted only).

        Returns:
            The number of rows added.
        """
        if predictions is not None and len(predictions) != len(rows):
            raise DataValidationError(f"{len(rows)} rows but {len(predictions)} predictions", rows=len(rows))
        preds = [stats.prediction_value(p) for p in predictions] if predictions is not None else [None] * len(rows)
        with self._lock:
            for row, p in zip(rows, preds, strict=True):
                self._window.append((dict(row), p))
            self.received += len(rows)
            self.dropped += int(dropped)
        return len(rows)

    def count_dropped(self, n: int) -> None:
        """Count ``n`` samples dropped before they reached the monitor."""
        with self._lock:
            self.dropped += int(n)

    @property
    def window_size(self) -> int:
        """Rows in the window now."""
        return len(self._window)

    def window_frame(self) -> pd.DataFrame:
        """The window as a frame: every key the rows carried, plus the prediction column."""
        import pandas as pd

        with self._lock:
            items = list(self._window)
        frame = pd.DataFrame.from_records([r for r, _ in items]) if items else pd.DataFrame()
        frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *self.kinds])))
        frame[self.cfg.prediction_column] = pd.Series([p for _, p in items], dtype=object)
        return frame

    # ------------------------------------------------------------------ drift

    def _prediction(self) -> tuple[str, stats.ColumnKind] | None:
        if self.prediction_reference is None:
            return None
        return (self.cfg.prediction_column, "cat" if self.task == "classification" else "num")

    def _reference_for_compare(self) -> pd.DataFrame:
        ref = self.reference
        pred = self.cfg.prediction_column
        if self.prediction_reference is not None and self.prediction_reference != pred:
            ref = ref.assign(**{pred: ref[self.prediction_reference]})
        return ref

    def compute(self) -> dict[str, Any]:
        """Compare the window with the reference now; runs the drift callbacks when drift starts.

        Returns:
            The result dict of ``stats.compute_drift`` (``status`` ``insufficient_data`` below
            ``min_samples`` rows), with the monitor's counters under ``"monitor"``.
        """
        now = self.clock()
        frame = self.window_frame()
        with self._lock:
            self._next_at = now + self.cfg.interval_s
        if len(frame) < self.cfg.min_samples:
            result = stats.empty_result(
                "insufficient_data", len(frame), len(self.reference), computed_at=now, min_samples=self.cfg.min_samples
            )
        else:
            result = stats.compute_drift(
                self._reference_for_compare(),
                frame,
                self.kinds,
                prediction=self._prediction(),
                options=self.options,
                skipped=self.skipped,
                now=now,
            )
        with self._lock:
            self.computations += 1
            self.last_compute_at = now
            self._last_frame = frame
            started = result["drift_detected"] and not self.drift_active
            ended = self.drift_active and result["status"] == "ok" and not result["drift_detected"]
            if result["status"] == "ok":
                self.drift_active = result["drift_detected"]
            if started:
                self.drift_events += 1
            result["drift_started"] = started
            result["monitor"] = self.counters()
            self.last_result = result
        if result["drift_detected"]:
            self._on_drift(result, started)
        elif ended:
            log.info("drift monitor %s: drift ended (share %.2f)", self.name, result["drift_share"])
        return result

    def due(self) -> bool:
        """True once ``interval_s`` has passed on the clock since the last computation (or the start)."""
        return self.clock() >= self._next_at

    def maybe_compute(self) -> dict[str, Any] | None:
        """Compute when due and the window holds ``min_samples`` rows; otherwise None (and stay due)."""
        if not self.due() or self.window_size < self.cfg.min_samples:
            return None
        return self.compute()

    def report_html(self, fresh: bool = False) -> str:
        """Evidently's HTML drift report of the window of the last computation (or the current window)."""
        with self._lock:
            frame = self._last_frame
        if fresh or frame is None:
            frame = self.window_frame()
        if len(frame) == 0:
            raise FabricError(f"drift monitor {self.name}: the window is empty, nothing to report yet")
        return stats.report_html(
            self._reference_for_compare(), frame, self.kinds, prediction=self._prediction(), options=self.options
        )

    def counters(self) -> dict[str, Any]:
        """Window size and counters, JSON-ready."""
        with self._lock:
            return {
                "name": self.name,
                "window_size": len(self._window),
                "window_capacity": self.cfg.window_size,
                "reference_size": len(self.reference),
                "received": self.received,
                "dropped": self.dropped,
                "computations": self.computations,
                "drift_events": self.drift_events,
                "drift_active": self.drift_active,
                "last_compute_at": self.last_compute_at,
                "last_retrain_at": self.last_retrain_at,
                "last_retrain_job": self.last_retrain_job,
                "features": list(self.kinds),
            }

    # ------------------------------------------------------------------ on drift

    def _on_drift(self, result: dict[str, Any], started: bool) -> None:
        pred = result.get("prediction") or {}
        log.warning(
            "drift monitor %s: drift detected: %d/%d columns drifted (share %.2f, threshold %.2f)%s%s; window %d",
            self.name,
            len(result["drifted_columns"]),
            result["number_of_columns"],
            result["drift_share"],
            result["drift_share_threshold"],
            f" [{', '.join(result['drifted_columns'])}]" if result["drifted_columns"] else "",
            f"; prediction drift ({pred.get('test')} {pred.get('score')})" if pred.get("drifted") else "",
            result["window_size"],
        )
        if not started:
            return  # webhook and retraining fire once per drift episode
        if self.cfg.webhook_url:
            self.post_webhook(result)
        if self.cfg.retrain:
            self.submit_retrain(reason="drift")

    def post_webhook(self, result: dict[str, Any]) -> bool:
        """POST the result to ``webhook_url`` (JSON); False, logged, when it fails or times out."""
        body = json.dumps({"event": "drift", "monitor": self.name, "result": result}, default=str).encode()
        req = urllib.request.Request(
            self.cfg.webhook_url or "", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.webhook_timeout_s) as resp:
                resp.read()
            return True
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a malformed URL
            log.warning("drift monitor %s: webhook %s failed: %s", self.name, self.cfg.webhook_url, e)
            return False

    def write_window(self, path: str | Path | None = None) -> str:
        """Write the window as parquet (for a retraining job to read); returns where."""
        if path is None:
            base = self.work_dir or str(Path(self.run_dir or ".") / "monitor")
            path = f"{base.rstrip('/')}/windows/window-{int(self.clock() * 1000)}.parquet"
        frame = self._like_reference(self.window_frame())
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        write_bytes(path, buf.getvalue())
        return str(path)

    def _like_reference(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Columns typed for parquet: numeric where the reference is (or the values all are), else strings.

        Rows from JSON can mix ``1``, ``1.0`` and ``"1"`` in one column, which parquet cannot store.
        """
        import pandas as pd

        out = {}
        for col in frame.columns:
            s = frame[col]
            ref = self.reference[col] if col in self.reference.columns else None
            if ref is not None and pd.api.types.is_numeric_dtype(ref) and not pd.api.types.is_bool_dtype(ref):
                s = pd.to_numeric(s, errors="coerce")
            elif s.dtype == object:
                try:
                    s = pd.to_numeric(s)
                except (TypeError, ValueError):
                    s = s.map(stats.category_key, na_action="ignore")
            out[col] = s
        return pd.DataFrame(out, index=frame.index)

    def submit_retrain(self, reason: str = "drift") -> str | None:
        """Submit the retraining job with the window as new data, unless in cooldown; returns the job id."""
        now = self.clock()
        if self.last_retrain_at is not None and now - self.last_retrain_at < self.cfg.retrain_cooldown_s:
            log.info("drift monitor %s: retraining skipped (cooldown)", self.name)
            return None
        try:
            window_path = self.write_window()
            entrypoint = self.cfg.retrain_entrypoint.format(
                window_path=window_path, run_dir=self.run_dir or ".", reason=reason
            )
            factory = self.job_client_factory
            if factory is None:
                from fabric.runtime import job_client as factory
            client = factory(self.cfg.retrain_address)
            runtime_env = {"working_dir": self.cfg.retrain_working_dir} if self.cfg.retrain_working_dir else None
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                metadata={"fabric": "retrain", "monitor": self.name, "reason": reason},
            )
        except Exception as e:  # a monitor must outlive an unreachable job API
            log.warning("drift monitor %s: retraining job not submitted: %s", self.name, e)
            return None
        with self._lock:
            self.last_retrain_at = now
            self.last_retrain_job = str(job_id)
        log.warning("drift monitor %s: submitted retraining job %s: %s", self.name, job_id, entrypoint)
        return str(job_id)

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        """Everything a restarted monitor needs: reference, window, counters, last result (picklable)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "name": self.name,
                "reference": self.reference,
                "spec": dict(self.spec),
                "column_types": {**self.kinds, **self.skipped},
                "fingerprint": self.fingerprint,
                "window": list(self._window),
                "received": self.received,
                "dropped": self.dropped,
                "computations": self.computations,
                "drift_events": self.drift_events,
                "drift_active": self.drift_active,
                "last_result": self.last_result,
                "last_compute_at": self.last_compute_at,
                "last_retrain_at": self.last_retrain_at,
                "last_retrain_job": self.last_retrain_job,
                "saved_at": self.clock(),
            }

    @classmethod
    def from_state(cls, cfg: MonitorConfig, state: Mapping[str, Any], **kwargs: Any) -> DriftMonitor:
        """Rebuild a monitor from ``state()`` (the window is cut to the config's ``window_size``)."""
        if state.get("version") != STATE_VERSION:
            raise FabricError(f"drift monitor state version {state.get('version')!r}, expected {STATE_VERSION}")
        kwargs.setdefault("name", state.get("name"))
        mon = cls(cfg, state["reference"], **state["spec"], column_types=state["column_types"], **kwargs)
        mon.restore(state)
        return mon

    def restore(self, state: Mapping[str, Any], *, window_only: bool = False) -> None:
        """Take the window and counters (and unless ``window_only``, the reference) from ``state()``."""
        if not window_only:
            self._set_reference(state["reference"], **state["spec"], column_types=state["column_types"])
        with self._lock:
            self._window.clear()
            self._window.extend(state["window"])
            for key in ("received", "dropped", "computations", "drift_events", "drift_active", "last_result",
                        "last_compute_at", "last_retrain_at", "last_retrain_job"):  # fmt: skip
                setattr(self, key, state[key])
            if self.last_compute_at is not None:
                self._next_at = self.last_compute_at + self.cfg.interval_s

    def save(self, path: str | Path) -> None:
        """Checkpoint ``state()`` to ``path`` (atomically; a local path or a pyarrow URI)."""
        write_bytes(path, pickle.dumps(self.state(), protocol=pickle.HIGHEST_PROTOCOL))

    @staticmethod
    def read_state(path: str | Path) -> dict[str, Any] | None:
        """The state saved at ``path``, or None when there is none (or it cannot be read, logged)."""
        data = read_bytes(path)
        if data is None:
            return None
        try:
            return pickle.loads(data)
        except Exception as e:  # a torn or foreign file must not keep the actor from starting
            log.warning("drift monitor: ignoring unreadable checkpoint %s: %s", path, e)
            return None

    @classmethod
    def load(cls, cfg: MonitorConfig, path: str | Path, **kwargs: Any) -> DriftMonitor | None:
        """The monitor checkpointed at ``path``, or None."""
        state = cls.read_state(path)
        return cls.from_state(cfg, state, **kwargs) if state is not None else None

    @classmethod
    def from_run_dir(cls, cfg: PipelineConfig, **kwargs: Any) -> DriftMonitor:
        """A monitor over ingestion's reference sample in ``<cfg.run_dir>/data``."""
        reference, meta = load_reference(cfg.run_dir)
        kwargs.setdefault("run_dir", cfg.run_dir)
        return cls(cfg.monitor, reference, **reference_spec(cfg, reference, meta), **kwargs)
