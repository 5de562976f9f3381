"""The training stage on a real local Ray (2 CPUs): DDP, DeepSpeed ZeRO on CPU, and recovery."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fabric.config import PipelineConfig
from fabric.models import load_model
from fabric.train import TrainResult, run
from tests.unit.train.synthetic import write_synthetic

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cfg(run_dir: Path, **train: object) -> PipelineConfig:
    base = {"epochs": 3, "num_workers": 2, "batch_size": 32, "lr": 0.05, "dropout": 0.0, "max_failures": 0}
    return PipelineConfig.model_validate({"name": "t", "run_dir": str(run_dir), "train": {**base, **train}})


def _jobs_train_main():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("jobs_train", ROOT / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.main


def _accuracy(model_path: Path, data: Path) -> float:
    import pandas as pd

    model, meta = load_model(model_path)
    frame = pd.read_parquet(data / "test")
    x = torch.tensor(frame[meta["feature_names"]].to_numpy())
    with torch.no_grad():
        return float((model(x).argmax(-1).numpy() == frame["label"].to_numpy()).mean())


def test_missing_data_exits_1_telling_to_ingest(ray_local: None, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _jobs_train_main()([f"run_dir={tmp_path}"]) == 1
    assert "run the ingestion stage first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ddp_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """One 3-epoch DDP run on 2 workers in which rank 1's process exits at the start of epoch 2
    (once: a marker file guards it), shared by the tests below (a fit costs tens of seconds here)."""
    run_dir = tmp_path_factory.mktemp("ddp")
    write_synthetic(run_dir)
    crash = {"fault_injection": {"epoch": 2, "rank": 1, "marker": str(run_dir / "crashed")}}
    return run_dir, run(_cfg(run_dir, epochs=3, max_failures=1), loop_overrides=crash)


def test_ddp_two_workers_learns_and_writes_the_artifact(ddp_run: tuple[Path, TrainResult]) -> None:
    run_dir, result = ddp_run
    assert isinstance(result, TrainResult)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.metrics["epoch"] == 3 and result.metrics["world_size"] == 2
    assert result.metrics["val_accuracy"] > 0.8
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == [
        "history.json", "model.json", "model.pt", "train_state.pt"
    ]
    assert result.model_path == (run_dir / "train" / "model").resolve()
    assert sorted(p.name for p in result.model_path.iterdir()) == ["model.json", "model.pt"]
    meta = json.loads((result.model_path / "model.json").read_text())
    assert meta["task"] == "classification" and meta["num_classes"] == 2 and meta["kwargs"]["input_dim"] == 4
    assert _accuracy(result.model_path, run_dir / "data") > 0.8


def test_a_killed_worker_resumes_from_its_checkpoint(ddp_run: tuple[Path, TrainResult]) -> None:
    run_dir, result = ddp_run
    assert (run_dir / "crashed").is_file(), "the worker never exited: nothing was recovered"
    # The history the last checkpoint carries, across the restart: epochs 2 and 3 ran in an attempt that
    # started from epoch 1's checkpoint (a restart from scratch would read 0, 0, 0).
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 1]


def test_deepspeed_zero2_on_cpu_trains_and_checkpoints(ray_local: None, tmp_path: Path) -> None:
    data = write_synthetic(tmp_path)
    # The real job entrypoint, with overrides as a person would type them.
    code = _jobs_train_main()(
        [f"run_dir={tmp_path}", "name=ds", "train.strategy=deepspeed", "train.deepspeed.zero_stage=2",
         "train.num_workers=2", "train.epochs=2", "train.batch_size=32", "train.lr=0.02", "train.dropout=0"]
    )  # fmt: skip
    assert code == 0
    (runs,) = (tmp_path / "train").glob("ds-*")  # the run: its name and run key
    last = runs / "epoch_0002"
    # Both ranks' ZeRO partitions merged into one checkpoint, plus model.json.
    shards = sorted(p.name for p in (last / "deepspeed").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (last / "model.json").is_file() and (last / "history.json").is_file()
    # The artifact needs neither DeepSpeed nor Ray to load.
    assert _accuracy(tmp_path / "train" / "model", data) > 0.75
