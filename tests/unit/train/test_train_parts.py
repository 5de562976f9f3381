"""The training stage's pieces that need no Ray: loss and metrics, data reading, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fabric.config import PipelineConfig
from fabric.errors import ConfigError, FabricError
from fabric.models import build_mlp, load_model
from fabric.train import loop_config
from fabric.train._checkpoint import kind, load_ddp, save_ddp, to_artifact
from fabric.train._data import collate, data_dir, iter_local, local_shard, read_meta
from fabric.train._loop import DEFAULTS, deepspeed_config, spec_from_config
from fabric.train._metrics import EpochSums, compute_loss, epoch_line
from tests.unit.train.synthetic import write_synthetic


def test_loss_is_cross_entropy_or_mse() -> None:
    logits, classes = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(compute_loss("classification", logits, classes), F.cross_entropy(logits, classes))
    out, target = torch.randn(5, 1), torch.randn(5)
    torch.testing.assert_close(compute_loss("regression", out, target), F.mse_loss(out[:, 0], target))


def test_epoch_sums_weigh_batches_by_rows() -> None:
    sums = EpochSums("classification")
    sums.add(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]), torch.tensor(1.0))  # 1 of 2 right
    sums.add(torch.tensor([[0.0, 2.0]]), torch.tensor([1]), torch.tensor(4.0))  # right
    assert sums.all_reduce() is sums  # no process group: a no-op
    assert sums.metrics("val") == pytest.approx({"val_loss": (2 * 1.0 + 4.0) / 3, "val_accuracy": 2 / 3})
    reg = EpochSums("regression")
    reg.add(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 0.0]), torch.tensor(5.0))
    assert reg.metrics("val")["val_rmse"] == pytest.approx(math.sqrt(5.0))


def test_epoch_line_is_readable() -> None:
    line = epoch_line({"epoch": 3, "train_loss": 0.4123, "val_loss": 0.398, "val_accuracy": 0.871, "epoch_s": 2.06}, 10)
    assert line == "epoch 3/10  train_loss 0.4123  val_loss 0.3980  val_accuracy 0.8710  (2.1s)"


def test_missing_data_tells_to_run_ingestion(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path)})
    with pytest.raises(FabricError, match="run the ingestion stage first"):
        loop_config(cfg)


def test_loop_config_carries_meta_and_train_settings(tmp_path: Path) -> None:
    write_synthetic(tmp_path, task="regression", features=3)
    cfg = PipelineConfig.model_validate(
        {"run_dir": str(tmp_path), "train": {"lr": 0.05, "strategy": "deepspeed", "deepspeed": {"zero_stage": 1}}}
    )
    config = loop_config(cfg)
    assert config["data_dir"] == str(data_dir(tmp_path)) and Path(config["data_dir"]).is_absolute()
    assert config["task"] == "regression" and config["feature_names"] == ["x0", "x1", "x2"]
    assert (config["lr"], config["strategy"], config["zero_stage"]) == (0.05, "deepspeed", 1)
    spec = spec_from_config({**DEFAULTS, **config})
    assert spec["kwargs"]["input_dim"] == 3 and spec["kwargs"]["output_dim"] == 1 and spec["num_classes"] is None


def test_deepspeed_config_follows_the_loop_config() -> None:
    base = {**DEFAULTS, "batch_size": 16, "zero_stage": 2}
    ds = deepspeed_config(base, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2} and ds["train_batch_size"] == 32 and "optimizer" not in ds
    offload = deepspeed_config({**base, "zero_stage": 3, "offload_optimizer": True}, world_size=1)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam runs the offloaded step


def test_local_shards_are_equal_and_disjoint(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, rows=(101, 10, 10))
    features = read_meta(folder)["feature_names"]
    shards = [local_shard(folder, "train", features, rank, 2) for rank in range(2)]
    assert [len(s["label"]) for s in shards] == [50, 50]  # equal, so DDP steps stay in lockstep
    assert not set(shards[0]["x0"].tolist()) & set(shards[1]["x0"].tolist())
    batches = list(iter_local(shards[0], 16, features, "classification", seed=1))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 4) and y.dtype == torch.int64
    again = next(iter_local(shards[0], 16, features, "classification", seed=1))
    torch.testing.assert_close(again[0], x)


def test_collate_stacks_features_in_meta_order() -> None:
    batch = {"b": np.array([1.0, 2.0]), "a": np.array([3.0, 4.0]), "label": np.array([0.5, 1.5])}
    x, y = collate(batch, ["a", "b"], "regression")
    torch.testing.assert_close(x, torch.tensor([[3.0, 1.0], [4.0, 2.0]]))
    assert y.dtype == torch.float32


def _trained_pair() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    config = {**DEFAULTS, "task": "classification", "feature_names": ["a", "b"], "num_classes": 3, "hidden_size": 8}
    spec = spec_from_config(config)
    model = build_mlp(**spec["kwargs"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss = compute_loss("classification", model(torch.randn(4, 2)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    return model, opt, spec


def test_ddp_checkpoint_round_trip_and_artifact(tmp_path: Path) -> None:
    model, opt, spec = _trained_pair()
    ckpt = tmp_path / "epoch_0004"
    save_ddp(ckpt, model, opt, epoch=4, spec=spec)
    assert kind(ckpt) == "ddp"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.json", "model.pt", "train_state.pt"]

    fresh = build_mlp(**spec["kwargs"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_ddp(ckpt, fresh, fresh_opt) == 4
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    artifact = to_artifact(ckpt, tmp_path / "model")
    loaded, meta = load_model(artifact)
    x = torch.randn(3, 2)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta["num_classes"] == 3 and meta["feature_names"] == ["a", "b"]


def test_an_unknown_checkpoint_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FabricError, match="neither a DDP nor a DeepSpeed checkpoint"):
        kind(tmp_path)


def test_training_and_finetuning_share_the_worker_group_settings(tmp_path: Path) -> None:
    """`llm.finetune` takes the same worker-group settings as `train` (placement included) into its trainer."""
    from fabric.config import load_config
    from fabric.train._trainer import worker_group_trainer

    cfg = load_config(
        None,
        [
            "llm.finetune.num_workers=3",
            "llm.finetune.use_gpu=false",
            "llm.finetune.placement_strategy=SPREAD",
            "llm.finetune.max_failures=4",
            "llm.finetune.keep_checkpoints=1",
        ],
    )
    assert cfg.llm.finetune.epochs == 2 and cfg.train.epochs == 5  # each keeps its own defaults
    trainer = worker_group_trainer(lambda c: None, {}, cfg.llm.finetune, {}, name="t", storage=tmp_path)
    scaling, run = trainer.scaling_config, trainer.run_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.placement_strategy) == (3, False, "SPREAD")
    assert run.failure_config.max_failures == 4 and run.storage_path == str(tmp_path)
    assert run.checkpoint_config.num_to_keep == 1
    with pytest.raises(ConfigError, match="placement_strategy"):
        load_config(None, ["llm.finetune.placement_strategy=ANYWHERE"])
