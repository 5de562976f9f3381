"""The training stage on CUDA: DDP over NCCL, and DeepSpeed ZeRO-3 with the optimizer offloaded to CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fabric.config import PipelineConfig
from fabric.models import load_model
from fabric.train import run
from tests.unit.train.synthetic import write_synthetic

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _cfg(run_dir: Path, **train: object) -> PipelineConfig:
    workers = min(2, torch.cuda.device_count())
    base = {"epochs": 3, "num_workers": workers, "batch_size": 32, "lr": 0.02, "dropout": 0.0, "use_gpu": "auto"}
    return PipelineConfig.model_validate({"name": "gpu", "run_dir": str(run_dir), "train": {**base, **train}})


def _check(result) -> None:  # type: ignore[no-untyped-def]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    model, meta = load_model(result.model_path)  # on CPU, without Ray or DeepSpeed
    assert meta["kwargs"]["input_dim"] == 4
    assert next(model.parameters()).device.type == "cpu"


def test_ddp_over_nccl(ray_local: None, tmp_path: Path) -> None:
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1, "use_gpu=auto needs Ray to see the GPU"
    write_synthetic(tmp_path)
    result = run(_cfg(tmp_path))
    _check(result)
    assert (result.checkpoint_dir / "train_state.pt").is_file()


def test_deepspeed_zero3_with_optimizer_offload(ray_local: None, tmp_path: Path) -> None:
    write_synthetic(tmp_path)
    cfg = _cfg(tmp_path, strategy="deepspeed", deepspeed={"zero_stage": 3, "offload_optimizer": True})
    result = run(cfg)
    _check(result)
    assert (result.checkpoint_dir / "deepspeed").is_dir()
    assert result.metrics["val_accuracy"] > 0.75
