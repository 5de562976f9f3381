"""Honest reruns on a real local Ray and MLflow: the same config and data train and register nothing new,
an interrupted run resumes, changed hyperparameters train a new run beside the old one, and a model that
does not beat the trivial baseline is never made champion."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fabric import tracking, train
from fabric.config import PipelineConfig
from fabric.errors import FabricError
from tests.unit.train.synthetic import write_synthetic

pytestmark = pytest.mark.integration


def _cfg(run_dir: Path, model_name: str, **train_settings: object) -> PipelineConfig:
    # One worker: a Ray Train run starts sooner, and a rerun's decisions do not depend on the workers' number.
    base = {"epochs": 2, "num_workers": 1, "batch_size": 32, "lr": 0.05, "dropout": 0.0, "max_failures": 0}
    return PipelineConfig.model_validate({
        "name": "r",
        "run_dir": str(run_dir),
        "track": {"model_name": model_name, "promotion": {"bootstrap_samples": 100}},
        "train": {**base, **train_settings},
    })  # fmt: skip


def test_reruns_train_and_register_only_what_changed(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic(tmp_path)
    cfg = _cfg(tmp_path, "rerun")
    crash = {"fault_injection": {"epoch": 2, "rank": 0, "marker": str(tmp_path / "crashed")}}
    with pytest.raises(FabricError, match="training failed"):
        train.run(cfg, loop_overrides=crash)  # interrupted at epoch 2, after epoch 1's checkpoint

    resumed = train.run(cfg)
    assert "resuming the interrupted run from its checkpoint of epoch 1" in capsys.readouterr().out
    assert resumed.trained_epochs == 1
    assert [(h["epoch"], h["resumed_from_epoch"]) for h in resumed.history] == [(1, 0), (2, 1)]
    first = tracking.run(cfg, resumed)
    assert (first.registered, first.version, first.promoted) == (True, "1", True)

    again = train.run(cfg)  # the same config on the same data
    assert "training: nothing to do" in capsys.readouterr().out
    assert again.trained_epochs == 0 and again.run_key == resumed.run_key
    assert again.checkpoint_dir == resumed.checkpoint_dir and again.history == resumed.history
    same = tracking.run(cfg, again)
    assert (same.registered, same.version) == (False, "1")

    tuned = _cfg(tmp_path, "rerun", lr=0.02, epochs=3, checkpoint_every=2, keep_checkpoints=1)
    new = train.run(tuned)  # changed hyperparameters: a new run beside the old one, no error
    assert new.trained_epochs == 3 and new.run_key != resumed.run_key
    assert len(list((tmp_path / "train").glob("r-*"))) == 2
    # Checkpoints at epoch 2 (every 2) and 3 (the last), only the latest kept; the history is whole.
    assert [p.name for p in new.checkpoint_dir.parent.glob("epoch_*")] == ["epoch_0003"]
    assert [h["epoch"] for h in new.history] == [1, 2, 3]
    second = tracking.run(tuned, new)
    assert (second.registered, second.version) == (True, "2")

    from mlflow import MlflowClient

    versions = MlflowClient(first.tracking_uri).search_model_versions("name='rerun'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]


def test_a_model_worse_than_the_mean_is_not_champion(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_synthetic(tmp_path, task="regression")
    for split in ("train", "val", "test"):  # targets around 100: one slow epoch leaves the outputs near 0
        for part in (data / split).glob("*.parquet"):
            frame = pd.read_parquet(part)
            frame.assign(label=frame["label"] + 100.0).to_parquet(part, index=False)
    cfg = _cfg(tmp_path, "below", epochs=1, lr=1e-4)
    trained = train.run(cfg)
    assert "does NOT beat the trivial baseline (training mean" in capsys.readouterr().out
    assert trained.metrics["val_rmse"] > trained.metrics["baseline_val_rmse"]
    assert trained.metrics["test_rmse"] > trained.metrics["baseline_test_rmse"]
    registered = tracking.run(cfg, trained)
    assert registered.registered and not registered.promoted and registered.champion_version == ""
    assert "does not beat the trivial baseline" in registered.decision
    assert registered.numbers["test.rmse"] > registered.numbers["test.baseline_rmse"]

    from mlflow import MlflowClient

    client = MlflowClient(registered.tracking_uri)
    run = client.get_run(registered.run_id)
    assert run.data.metrics["baseline.beaten"] == 0.0 and "final.baseline_val_rmse" in run.data.metrics
    assert "does not beat" in client.get_model_version("below", "1").tags["promotion.reason"]
