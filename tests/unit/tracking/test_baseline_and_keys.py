"""The trivial baseline, run keys, and the registry's use of both, against a real MLflow sqlite store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fabric.config import load_config
from fabric.tracking import beats, digest_splits, fit_baseline, run, run_key
from tests.unit.tracking import fixtures as fx


def _write_split(folder: Path, frame: pd.DataFrame, parts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    for i, rows in enumerate(np.array_split(np.arange(len(frame)), parts)):
        frame.iloc[rows].to_parquet(folder / f"{i}-{parts}.parquet", index=False)


def test_the_data_digest_is_of_rows_not_files(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(20, dtype=np.float32), "label": np.arange(20) % 2})
    a, b = tmp_path / "a", tmp_path / "b"
    for root, rows, parts in ((a, frame, 1), (b, frame.sample(frac=1, random_state=0), 3)):
        for split in ("train", "val", "test"):
            _write_split(root / split, rows, parts)
        (root / "meta.json").write_text("{}")
    assert digest_splits(a) == digest_splits(b)  # other file names, other row order: same data
    assert (a / ".digest.json").is_file() and digest_splits(a) == digest_splits(b)  # the cached value agrees
    changed = frame.assign(x=frame["x"].where(frame.index != 3, 99.0))
    _write_split(b / "test", changed, 1)
    (b / "meta.json").write_text("{}\n")  # ingestion rewrites meta.json last: the cache is stale
    assert digest_splits(b) != digest_splits(a)


def test_run_keys_change_with_settings_and_inputs() -> None:
    key = run_key({"lr": 0.1, "epochs": 3}, {"data": "d1"})
    assert key == run_key({"epochs": 3, "lr": 0.1}, {"data": "d1"}) and len(key) == 12
    assert key != run_key({"lr": 0.01, "epochs": 3}, {"data": "d1"})
    assert key != run_key({"lr": 0.1, "epochs": 3}, {"data": "d2"})


def test_baselines_predict_the_majority_class_or_the_mean(tmp_path: Path) -> None:
    _write_split(tmp_path / "train", pd.DataFrame({"label": [0, 1, 1, 1, 2]}), 1)
    clf = fit_baseline(tmp_path, "classification", 3)
    assert clf.name == "the majority class (1)"
    scores = clf.scores(np.array([1, 1, 0, 2]))
    assert scores["accuracy"] == 0.5
    assert beats({"accuracy": 0.75, "log_loss": 9.0}, scores, "classification")
    assert not beats({"accuracy": 0.5, "log_loss": scores["log_loss"] + 0.1}, scores, "classification")
    assert beats({"accuracy": 0.5, "log_loss": scores["log_loss"] - 0.1}, scores, "classification")

    _write_split(tmp_path / "reg" / "train", pd.DataFrame({"label": [1.0, 2.0, 3.0, 6.0]}), 1)
    reg = fit_baseline(tmp_path / "reg", "regression")
    assert reg.name == "the training mean (3)"
    assert reg.scores(np.array([3.0, 5.0]))["rmse"] == pytest.approx(np.sqrt(2.0))
    assert not beats({"rmse": 2.0}, {"rmse": 1.5}, "regression")


def test_a_model_worse_than_the_mean_is_never_champion_and_a_rerun_registers_nothing(tmp_path: Path) -> None:
    overrides = [f"run_dir={tmp_path / 'run'}", "track.model_name=below", "track.promotion.bootstrap_samples=100"]
    cfg = load_config(None, overrides)
    data = fx.make_data(cfg.run_dir, task="regression", n=300)
    for split in ("train", "test"):  # targets far from 0: an untrained network (outputs ~0) misses them all
        folder = Path(cfg.run_dir) / "data" / split
        frame = pd.read_parquet(folder)
        frame.assign(label=frame["label"] + 50.0).to_parquet(next(folder.glob("*.parquet")), index=False)
    model = fx.make_model(tmp_path / "untrained", data, steps=0)
    result = replace(fx.train_result(model), run_key="k1")
    first = run(cfg, result, model_loader=fx.MODEL_LOADER)
    assert first.registered and first.version == "1" and not first.promoted
    assert first.aliases == ["candidate"] and first.champion_version == ""
    assert "does not beat the trivial baseline of predicting the training mean" in first.decision
    assert first.numbers["baseline.beaten"] == 0.0
    assert first.numbers["test.rmse"] > first.numbers["test.baseline_rmse"]

    again = run(cfg, result, model_loader=fx.MODEL_LOADER)  # the same training, registered again
    assert not again.registered and again.version == "1" and "nothing new to register" in again.decision

    from mlflow import MlflowClient

    client = MlflowClient(first.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name='below'")] == ["1"]
    assert client.get_model_version("below", "1").tags["fabric.run_key"] == "k1"
