"""The MetricLogger seam and its adapters: MLflow (the default) and W&B (offline unless told otherwise).

Each adapter imports its library inside ``__init__`` and raises MissingExtraError naming the extra, so
``import fabric.tracking`` stays cheap. Adapters created off rank 0 connect to nothing and write nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from fabric import storage
from fabric.errors import require
from fabric.tracking._rank import is_rank_zero

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

Status = Literal["success", "failed"]


@runtime_checkable
class MetricLogger(Protocol):
    """Where a stage records its parameters, metrics and files."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record hyperparameters; nested mappings are flattened to dotted keys."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record numeric metrics at ``step`` (an epoch, an iteration); non-numbers are skipped."""

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        """Attach a file or a folder to the run (under ``name`` when given)."""

    def finish(self, status: Status = "success") -> None:
        """Close the run. Further calls do nothing."""


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are finite-or-NaN numbers (bools count as 0/1), as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isinf(value)):
            out[key] = float(value)
    return out


# --------------------------------------------------------------------------- where MLflow records


def tracking_uri(cfg: PipelineConfig) -> str:
    """``cfg.track.tracking_uri``, else a sqlite store in the run folder: ``sqlite:///<run_dir>/mlflow.db``.

    A database is a file on local disk: with a URI run_dir the default store is ``mlflow.db`` in the run_dir's
    local copy (:func:`fabric.storage.local_root`, one per URI on this machine); runs on several machines share a
    registry through ``track.tracking_uri`` (an MLflow tracking server).
    """
    if cfg.track.tracking_uri:
        return cfg.track.tracking_uri
    run_dir = storage.local_root(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def artifact_location(cfg: PipelineConfig) -> str | None:
    """Artifacts of new experiments: ``<run_dir>/mlartifacts`` (a URI run_dir's: in the bucket) with the default
    store, else the server's choice."""
    if cfg.track.tracking_uri:
        return None
    if storage.is_uri(cfg.run_dir):
        return storage.join(cfg.run_dir, "mlartifacts")
    return (storage.local_root(cfg.run_dir) / "mlartifacts").as_uri()


def quiet_mlflow() -> None:
    """No per-file progress bars in job logs (the user's own setting wins)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) when missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:
        # Another process created it between our lookup and create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


# --------------------------------------------------------------------------- adapters


class NullLogger:
    """Records nothing: what ranks other than 0 get."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass

    def finish(self, status: Status = "success") -> None:
        pass


class MLflowLogger:
    """One MLflow run, written through ``MlflowClient`` (no global active-run state).

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///...``, ``http://...``, ``file:...``).
        experiment: experiment name, created when missing.
        run_name: the run's display name.
        artifact_location: artifact root for a newly created experiment (None: the store's default).
        tags: run tags.
        run_id: continue this existing run instead of creating one.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        *,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        mlflow = require("mlflow", "track")
        self.active = is_rank_zero()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri = tracking_uri
        self._finished = False
        if not self.active:
            return
        quiet_mlflow()
        self.client = mlflow.MlflowClient(tracking_uri)
        if run_id is not None:
            run = self.client.get_run(run_id)
        else:
            self.experiment_id = experiment_id(self.client, experiment, artifact_location)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id

    @classmethod
    def from_config(cls, cfg: PipelineConfig, run_name: str | None = None, **kwargs: Any) -> MLflowLogger:
        """A run in ``cfg.track.experiment`` at ``cfg.track.tracking_uri`` (or the run folder's sqlite store)."""
        return cls(
            tracking_uri(cfg),
            cfg.track.experiment,
            run_name or cfg.name,
            artifact_location=artifact_location(cfg),
            **kwargs,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow's per-batch limit on params
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in numeric(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tag the run (MLflow-only: tags are searchable in the UI)."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        if not self.active:
            return
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=name)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path=name)

    def finish(self, status: Status = "success") -> None:
        if not self.active or self._finished:
            return
        self.client.set_terminated(self.run_id, "FINISHED" if status == "success" else "FAILED")
        self._finished = True


class WandbLogger:
    """One W&B run; ``mode="offline"`` (the default) writes ``<dir>/wandb/offline-run-*`` and sends nothing.

    Args:
        project: W&B project.
        run_name: the run's display name.
        mode: ``offline``, ``online`` or ``disabled``.
        dir: the folder under which W&B writes its ``wandb/`` run folders.
        config: the run's hyperparameters.
    """

    def __init__(
        self,
        project: str,
        run_name: str | None = None,
        *,
        mode: Literal["offline", "online", "disabled"] = "offline",
        dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        wandb = require("wandb", "wandb")
        self.active = is_rank_zero()
        self._finished = False
        self.run: Any = None
        if not self.active:
            return
        self._wandb = wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=run_name,
            mode=mode,
            dir=str(dir) if dir is not None else None,
            config=dict(config or {}),
            reinit="create_new",  # several runs in one process (a pipeline, a test session)
            # console="off": the job log stays ours; disable_git: run folders need not be in a repository
            settings=wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True),
        )

    @classmethod
    def from_config(cls, cfg: PipelineConfig, run_name: str | None = None, **kwargs: Any) -> WandbLogger:
        """A run in ``cfg.track.wandb.project``, its folder under ``cfg.run_dir``."""
        w = cfg.track.wandb
        return cls(w.project, run_name or cfg.name, mode=w.mode, dir=Path(cfg.run_dir).resolve(), **kwargs)

    @property
    def run_dir(self) -> Path | None:
        """The local folder of this run (``.../wandb/offline-run-...``)."""
        return Path(self.run.dir).parent if self.run is not None and self.run.dir else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.active:
            self.run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            self.run.log(numeric(metrics), step=step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        if not self.active:
            return
        p = Path(path)
        # W&B artifact names allow letters, digits, '-', '_' and '.'.
        art_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in (name or p.name))
        artifact = self._wandb.Artifact(art_name, type="model" if p.is_dir() else "file")
        if p.is_dir():
            artifact.add_dir(str(p))
        else:
            artifact.add_file(str(p))
        self.run.log_artifact(artifact)

    def finish(self, status: Status = "success") -> None:
        if not self.active or self._finished:
            return
        self.run.finish(exit_code=0 if status == "success" else 1)
        self._finished = True


class MultiLogger:
    """Sends every call to each of ``loggers``."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = list(loggers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        for lg in self.loggers:
            lg.log_artifact(path, name)

    def finish(self, status: Status = "success") -> None:
        for lg in self.loggers:
            lg.finish(status)


def make_logger(cfg: PipelineConfig, run_name: str | None = None) -> MetricLogger:
    """MLflow, plus W&B when ``cfg.track.wandb.enabled``; a NullLogger off rank 0.

    Raises:
        MissingExtraError: mlflow (extra ``track``) or wandb (extra ``wandb``) is not installed.
    """
    if not is_rank_zero():
        return NullLogger()
    loggers: list[MetricLogger] = [MLflowLogger.from_config(cfg, run_name)]
    if cfg.track.wandb.enabled and cfg.track.wandb.mode != "disabled":
        loggers.append(WandbLogger.from_config(cfg, run_name))
    return loggers[0] if len(loggers) == 1 else MultiLogger(*loggers)
