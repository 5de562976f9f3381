"""MetricLogger adapters against real backends: MLflow on a sqlite store, W&B offline; rank-0 guard; extras."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fabric.config import PipelineConfig
from fabric.errors import MissingExtraError
from fabric.tracking import (
    MetricLogger,
    MLflowLogger,
    MultiLogger,
    NullLogger,
    WandbLogger,
    artifact_location,
    is_rank_zero,
    make_logger,
    on_rank_zero,
    tracking_uri,
    world_rank,
)


def _cfg(run_dir: str, *overrides: str) -> PipelineConfig:
    from fabric.config import load_config

    return load_config(None, [f"run_dir={run_dir}", *overrides])


@pytest.fixture
def rank_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be worker 1 of a Ray Train run (the guard reads ray.train's context)."""
    fake = types.ModuleType("ray.train")
    ctx = types.SimpleNamespace(get_world_rank=lambda: 1)
    fake.get_context = lambda: ctx  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray.train", fake)


def test_default_tracking_uri_is_sqlite_in_run_dir(tmp_run_dir: str) -> None:
    cfg = _cfg(tmp_run_dir)
    root = Path(tmp_run_dir).resolve()
    assert tracking_uri(cfg) == f"sqlite:///{root / 'mlflow.db'}"
    assert artifact_location(cfg) == (root / "mlartifacts").as_uri()
    custom = _cfg(tmp_run_dir, "track.tracking_uri=http://mlflow.internal:5000")
    assert tracking_uri(custom) == "http://mlflow.internal:5000" and artifact_location(custom) is None


def test_mlflow_logger_writes_params_metrics_artifacts(tmp_run_dir: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = _cfg(tmp_run_dir, "track.experiment=exp-a")
    lg = MLflowLogger.from_config(cfg, "run-1")
    assert isinstance(lg, MetricLogger)
    lg.log_params({"train": {"lr": 0.01, "hidden_size": 8}, "seed": 3})
    for epoch in range(3):
        lg.log_metrics({"val_loss": 1.0 / (epoch + 1), "note": "skipped"}, step=epoch)
    (tmp_path / "notes.txt").write_text("hello")
    lg.log_artifact(tmp_path / "notes.txt")
    lg.finish()
    lg.finish()  # idempotent

    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(lg.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert run.data.params == {"train.lr": "0.01", "train.hidden_size": "8", "seed": "3"}
    history = client.get_metric_history(lg.run_id, "val_loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert "note" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(lg.run_id)] == ["notes.txt"]
    # artifacts live under the run folder, not ./mlruns
    assert run.info.artifact_uri.startswith((Path(tmp_run_dir).resolve() / "mlartifacts").as_uri())


def test_wandb_offline_writes_its_run_folder(tmp_path: Path) -> None:
    lg = WandbLogger("fabric-test", "offline-run", dir=tmp_path, config={"lr": 0.1})
    lg.log_params({"train": {"epochs": 2}})
    lg.log_metrics({"val_loss": 0.5}, step=0)
    lg.log_metrics({"val_loss": 0.4}, step=1)
    (tmp_path / "model.json").write_text("{}")
    lg.log_artifact(tmp_path / "model.json")
    run_dir = lg.run_dir
    lg.finish()
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    assert run_dir.parent == tmp_path / "wandb"
    assert list(run_dir.glob("run-*.wandb")), "no offline run file written"


def test_make_logger_adds_wandb_when_enabled(tmp_run_dir: str) -> None:
    cfg = _cfg(tmp_run_dir, "track.wandb.enabled=true")
    lg = make_logger(cfg, "both")
    assert isinstance(lg, MultiLogger) and {type(x) for x in lg.loggers} == {MLflowLogger, WandbLogger}
    lg.log_metrics({"x": 1.0}, step=0)
    lg.finish()
    assert list((Path(tmp_run_dir) / "wandb").glob("offline-run-*"))
    assert isinstance(make_logger(_cfg(tmp_run_dir), "mlflow-only"), MLflowLogger)


def test_only_rank_zero_writes(rank_one: None, tmp_run_dir: str) -> None:
    assert world_rank() == 1 and not is_rank_zero()
    calls: list[int] = []

    @on_rank_zero
    def write() -> str:
        calls.append(1)
        return "wrote"

    assert write() is None and calls == []
    cfg = _cfg(tmp_run_dir, "track.wandb.enabled=true")
    assert isinstance(make_logger(cfg), NullLogger)
    lg = MLflowLogger.from_config(cfg)
    lg.log_params({"a": 1})
    lg.log_metrics({"b": 2.0}, step=0)
    lg.finish()
    assert lg.run_id is None and not (Path(tmp_run_dir) / "mlflow.db").exists()
    # the registry stage too: nothing registered, nothing written
    from fabric.tracking import run

    assert run(cfg, object()) is None  # type: ignore[arg-type]
    assert list(Path(tmp_run_dir).iterdir()) == []


def test_rank_outside_ray_train(monkeypatch: pytest.MonkeyPatch) -> None:
    # No Ray Train context (a driver): rank 0, unless torchrun says otherwise.
    fake = types.ModuleType("ray.train")

    def no_context() -> None:
        raise RuntimeError("`get_context` cannot be used outside of a Ray Train training function.")

    fake.get_context = no_context  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray.train", fake)
    monkeypatch.delenv("RANK", raising=False)
    assert world_rank() == 0
    monkeypatch.setenv("RANK", "2")
    assert world_rank() == 2


@pytest.mark.parametrize(("module", "extra", "make"), [
    ("mlflow", "track", lambda: MLflowLogger("sqlite:///x.db", "e")),
    ("wandb", "wandb", lambda: WandbLogger("p")),
])  # fmt: skip
def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, extra: str, make) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError) as err:
        make()
    assert err.value.extra == extra and f"pip install 'fabric[{extra}]'" in str(err.value)
    assert isinstance(err.value, ImportError)
