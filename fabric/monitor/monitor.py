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

STATE_VERSION = 2
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
    """Ingestion's reference sample and meta.json from ``<run_dir>/data`` (a URI run_dir's are downloaded).

    Raises:
        FabricError: when the ingest stage has not written them.
    """
    import pandas as pd

    from fabric import storage

    ref_path = storage.fetch(run_dir, "data/reference.parquet")
    if not ref_path.is_file():
        where = storage.join(run_dir, "data", "reference.parquet")
        raise FabricError(f"no reference sample at {where}: run the ingest stage first (fabric.data.run)")
    meta_path = storage.fetch(run_dir, "data/meta.json")
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
        target: the reference's label column (not a feature, and never compared with predictions: a model
            that is not perfect would always seem to drift).
        task: ``classification`` (the prediction is categorical) or ``regression`` (numerical); None infers
            it from the reference's prediction column, else from its target column.
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
        self._window: deque[tuple[dict[str, Any], Any, str | None]] = deque(maxlen=cfg.window_size)
        # version -> (model key, the model's predictions on the reference sample), sent by serving replicas
        self.prediction_refs: dict[str, tuple[str, list[Any]]] = {}
        self.received = 0
        self.dropped = 0
        self.computations = 0
        self.drift_events = 0
        self.last_result: dict[str, Any] | None = None
        self.last_compute_at: float | None = None
        self.last_retrain_at: float | None = None
        self.last_retrain_job: str | None = None
        self.drift_active = False
        self.last_reset_at: float | None = None
        self.tensor_rows = 0
        self.out_of_range_rows = 0
        self.out_of_range_features: dict[str, int] = {}
        self._next_at = clock() + cfg.interval_s
        self._last_frame: pd.DataFrame | None = None
        self._report: tuple[float, str] | None = None
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
        pred_ref = pred if pred in reference.columns else None
        typed_by = pred_ref or target
        if task is None and typed_by is not None:
            kind = stats.infer_kinds(reference, [typed_by])[0].get(typed_by, "cat")
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

        The window and counters are kept; the last result, the drift episode and the models' predictions on
        the reference, which were of the old reference, are cleared.
        """
        old = self.fingerprint
        self._set_reference(reference, target, task, features, categorical)
        if self.fingerprint != old:
            with self._lock:
                self.last_result = None
                self.drift_active = False
                self._last_frame = None
                self._report = None
                self.prediction_refs = {}

    @property
    def features(self) -> list[str]:
        """The feature columns compared, in reference order."""
        return list(self.kinds)

    # ------------------------------------------------------------------ the window

    def add(
        self,
        rows: Sequence[Mapping[str, Any]],
        predictions: Sequence[Any] | None = None,
        *,
        dropped: int = 0,
        version: str | None = None,
    ) -> int:
        """Append served rows (and their predictions) to the window; the oldest fall out past ``window_size``.

        Args:
            rows: one mapping of raw feature values per served row.
            predictions: one prediction per row (a scalar, or class scores whose argmax is taken), or None.
            dropped: samples the sender dropped under back-pressure since its last call (counted only).
            version: the model version that answered (its predictions are compared with that version's
                predictions on the reference sample).

        Returns:
            The number of rows added.
        """
        if predictions is not None and len(predictions) != len(rows):
            raise DataValidationError(f"{len(rows)} rows but {len(predictions)} predictions", rows=len(rows))
        preds = [stats.prediction_value(p) for p in predictions] if predictions is not None else [None] * len(rows)
        with self._lock:
            for row, p in zip(rows, preds, strict=True):
                self._window.append((dict(row), p, version))
            self.received += len(rows)
            self.dropped += int(dropped)
        return len(rows)

    def count_dropped(self, n: int) -> None:
        """Count ``n`` samples dropped before they reached the monitor."""
        with self._lock:
            self.dropped += int(n)

    def count_out_of_range(self, rows: int, flagged: int, features: Mapping[str, int]) -> None:
        """Count tensor rows served (``rows``) and those with a value outside the training range (``flagged``).

        Tensor input carries encoded features only, so it is not in the window; this is what the monitor
        learns of it. ``features``: feature name -> rows where it was out of range.
        """
        with self._lock:
            self.tensor_rows += int(rows)
            self.out_of_range_rows += int(flagged)
            for name, n in features.items():
                self.out_of_range_features[name] = self.out_of_range_features.get(name, 0) + int(n)

    def reset(self) -> int:
        """Empty the window and forget the last result and the drift episode; returns the rows dropped.

        The reference, the models' predictions on it and the lifetime counters (received, dropped, ...)
        are kept.
        """
        with self._lock:
            n = len(self._window)
            self._window.clear()
            self.last_result = None
            self._last_frame = None
            self._report = None
            self.drift_active = False
            self.last_reset_at = self.clock()
            self._next_at = self.last_reset_at + self.cfg.interval_s
        log.info("drift monitor %s: window reset (%d rows dropped)", self.name, n)
        return n

    @property
    def window_size(self) -> int:
        """Rows in the window now."""
        return len(self._window)

    def _snapshot(self) -> tuple[pd.DataFrame, list[str | None]]:
        """The window as a frame (every key the rows carried, plus the prediction column) and each row's version."""
        import pandas as pd

        with self._lock:
            items = list(self._window)
        frame = pd.DataFrame.from_records([r for r, _, _ in items]) if items else pd.DataFrame()
        frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *self.kinds])))
        frame[self.cfg.prediction_column] = pd.Series([p for _, p, _ in items], dtype=object)
        return frame, [v for _, _, v in items]

    def window_frame(self) -> pd.DataFrame:
        """The window as a frame: every key the rows carried, plus the prediction column."""
        return self._snapshot()[0]

    # ------------------------------------------------------------------ the models' predictions on the reference

    def set_prediction_reference(self, version: str, predictions: Sequence[Any], model: str, fingerprint: str) -> bool:
        """Take a model version's predictions on the reference sample (a serving replica computes them).

        Served predictions of ``version`` are compared with these: what the deployed model said on
        training-like data, not the labels (which differ from any imperfect model's predictions).

        Args:
            version: the served version.
            predictions: one per reference row, in the reference's row order.
            model: identifies the model behind the version (a new one replaces the old predictions).
            fingerprint: the reference they were computed on; ignored (False) when it is not the current one.
        """
        with self._lock:
            if fingerprint != self.fingerprint or len(predictions) != len(self.reference):
                return False
            self.prediction_refs[version] = (model, [stats.prediction_value(p) for p in predictions])
            self._report = None
        log.info("drift monitor %s: predictions of version %s on the reference sample received", self.name, version)
        return True

    def missing_prediction_references(self, models: Mapping[str, str]) -> list[str]:
        """The versions of ``models`` (version -> model key) with no predictions on the current reference."""
        with self._lock:
            return [v for v, key in models.items() if self.prediction_refs.get(v, (None,))[0] != key]

    def reference_inputs(self) -> tuple[str, pd.DataFrame]:
        """The current reference's fingerprint and its columns other than the target and prediction."""
        with self._lock:
            ref, fp = self.reference, self.fingerprint
        drop = [c for c in (self.target, self.cfg.prediction_column) if c in ref.columns]
        return fp, ref.drop(columns=drop)

    # ------------------------------------------------------------------ drift

    def _prediction_pairs(self, frame: pd.DataFrame, versions: Sequence[str | None]) -> dict[str, tuple[Any, Any]]:
        """Per version: (the model's predictions on the reference, the window's predictions of that version).

        Without any model's predictions on the reference, a prediction column of the reference sample (one
        the user put there) stands for every version.
        """
        import pandas as pd

        window = frame[self.cfg.prediction_column]
        with self._lock:
            refs = dict(self.prediction_refs)
        if refs:
            mask = pd.Series(versions, index=frame.index, dtype=object)
            return {v: (pd.Series(values, dtype=object), window[mask == v]) for v, (_, values) in refs.items()}
        if self.prediction_reference is not None:
            return {"*": (self.reference[self.prediction_reference], window)}
        return {}

    def compute(self) -> dict[str, Any]:
        """Compare the window with the reference now; runs the drift callbacks when drift starts.

        Returns:
            The result dict of ``stats.compute_drift`` (``status`` ``insufficient_data`` below
            ``min_samples`` rows), with the monitor's counters under ``"monitor"``.
        """
        now = self.clock()
        frame, versions = self._snapshot()
        with self._lock:
            self._next_at = now + self.cfg.interval_s
        if len(frame) < self.cfg.min_samples:
            result = stats.empty_result(
                "insufficient_data", len(frame), len(self.reference), computed_at=now, min_samples=self.cfg.min_samples
            )
        else:
            result = stats.compute_drift(
                self.reference,
                frame,
                self.kinds,
                predictions=self._prediction_pairs(frame, versions),
                prediction_kind="cat" if self.task == "classification" else "num",
                min_prediction_rows=self.cfg.min_samples,
                options=self.options,
                skipped=self.skipped,
                now=now,
            )
        with self._lock:
            self.computations += 1
            self.last_compute_at = now
            self._last_frame = frame
            self._report = None
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

    def answer(self, refresh: bool = False) -> dict[str, Any]:
        """What ``GET /monitor/drift`` answers: the last result (computed now when ``refresh`` or there is none),
        with the current counters and ``age_s``, the seconds since it was computed."""
        result = self.last_result
        if refresh or result is None:
            result = self.compute()
        return {**result, "age_s": max(0.0, self.clock() - result["computed_at"]), "monitor": self.counters()}

    def due(self) -> bool:
        """True once ``interval_s`` has passed on the clock since the last computation (or the start)."""
        return self.clock() >= self._next_at

    def maybe_compute(self) -> dict[str, Any] | None:
        """Compute when due and the window holds ``min_samples`` rows; otherwise None (and stay due)."""
        if not self.due() or self.window_size < self.cfg.min_samples:
            return None
        return self.compute()

    def report_html(self, refresh: bool = False) -> str:
        """The HTML drift report of the last result (computed now when ``refresh`` or there is none).

        It is rendered from that very result and its window: fabric's summary of the result (the numbers
        ``GET /monitor/drift`` answers, embedded as JSON too), then Evidently's report over the same columns
        with the same test and threshold per column.
        """
        result = self.last_result
        if refresh or result is None or self._last_frame is None:  # no frame: a result restored from a checkpoint
            result = self.compute()
        with self._lock:
            if self._report is not None and self._report[0] == result["computed_at"]:
                return self._report[1]
            frame = self._last_frame
        if result["status"] != "ok" or frame is None:
            raise FabricError(
                f"drift monitor {self.name}: nothing to report yet ({result['status']}: "
                f"{result['window_size']} rows in the window, {self.cfg.min_samples} needed)"
            )
        html = stats.report_html(self.reference, frame, result, self.kinds, name=self.name)
        with self._lock:
            if self.last_result is result:
                self._report = (result["computed_at"], html)
        return html

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
                "last_reset_at": self.last_reset_at,
                "features": list(self.kinds),
                "prediction_references": sorted(self.prediction_refs),
                "tensor_rows": self.tensor_rows,
                "out_of_range_rows": self.out_of_range_rows,
                "out_of_range_features": dict(self.out_of_range_features),
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
            f"; prediction drift (version {pred.get('version')}: {pred.get('test')} {pred.get('score')})"
            if pred.get("drifted")
            else "",
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
                "prediction_refs": dict(self.prediction_refs),
                "received": self.received,
                "dropped": self.dropped,
                "computations": self.computations,
                "drift_events": self.drift_events,
                "drift_active": self.drift_active,
                "last_result": self.last_result,
                "last_compute_at": self.last_compute_at,
                "last_retrain_at": self.last_retrain_at,
                "last_retrain_job": self.last_retrain_job,
                "last_reset_at": self.last_reset_at,
                "tensor_rows": self.tensor_rows,
                "out_of_range_rows": self.out_of_range_rows,
                "out_of_range_features": dict(self.out_of_range_features),
                "saved_at": self.clock(),
            }

    @classmethod
    def from_state(cls, cfg: MonitorConfig, state: Mapping[str, Any], **kwargs: Any) -> DriftMonitor:
        """Rebuild a monitor from ``state()`` (the window is cut to the config's ``window_size``)."""
        if state.get("version") not in (1, STATE_VERSION):
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
            # version 1 checkpoints hold (row, prediction) pairs, without the version
            self._window.extend(item if len(item) == 3 else (*item, None) for item in state["window"])
            if state.get("fingerprint") == self.fingerprint:
                self.prediction_refs = dict(state.get("prediction_refs") or {})
            for key in ("received", "dropped", "computations", "drift_events", "drift_active", "last_result",
                        "last_compute_at", "last_retrain_at", "last_retrain_job"):  # fmt: skip
                setattr(self, key, state[key])
            for key in ("last_reset_at", "tensor_rows", "out_of_range_rows"):
                setattr(self, key, state.get(key, getattr(self, key)))
            self.out_of_range_features = dict(state.get("out_of_range_features") or {})
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
