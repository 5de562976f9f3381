"""The registry stage against a real MLflow sqlite store: log, register, alias, promote, resolve, serve."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fabric.config import PipelineConfig, load_config
from fabric.errors import UsageError
from fabric.tracking import RegistryResult, resolve_model, run, tracking_uri
from tests.unit.tracking import fixtures as fx

NAME = "reg-test"


@dataclass
class Registry:
    cfg: PipelineConfig
    data: fx.Dataset
    first: RegistryResult
    worse: RegistryResult
    equal: RegistryResult


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Three candidates in one store: a trained model, an untrained one, then the trained one again."""
    root = tmp_path_factory.mktemp("registry")
    overrides = [f"run_dir={root / 'run'}", f"track.model_name={NAME}", "track.promotion.bootstrap_samples=300"]
    cfg = load_config(None, overrides)
    data = fx.make_data(cfg.run_dir)
    good = fx.make_model(root / "good", data, steps=150)
    bad = fx.make_model(root / "bad", data, steps=0, seed=1)
    loaders = {"model_loader": fx.MODEL_LOADER}  # the preprocessor loader stays fabric.data's
    first = run(load_config(None, [*overrides, "track.wandb.enabled=true"]), fx.train_result(good), **loaders)
    worse = run(cfg, fx.train_result(bad), **loaders)
    same = shutil.copytree(good, root / "good-again")
    equal = run(cfg, fx.train_result(same), **loaders)
    return Registry(cfg, data, first, worse, equal)


def _client(cfg: PipelineConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(cfg))


def test_first_candidate_becomes_champion(registry: Registry) -> None:
    r = registry.first
    assert (r.version, r.aliases, r.promoted, r.champion_version) == ("1", ["candidate", "champion"], True, "1")
    assert "no champion" in r.decision
    assert r.model_uri == f"models:/{NAME}@champion" and r.candidate_uri == f"models:/{NAME}/1"
    assert r.numbers["test.accuracy"] > 0.85
    assert Path(registry.cfg.run_dir, "mlflow.db").is_file()
    # W&B was enabled for this run: offline, its folder under the run folder
    assert len(list(Path(registry.cfg.run_dir, "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_run_records_params_per_epoch_metrics_and_decision(registry: Registry) -> None:
    client = _client(registry.cfg)
    run_ = client.get_run(registry.first.run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.hidden_size"] == str(registry.cfg.train.hidden_size)
    assert run_.data.params["data.task"] == "classification"
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val_loss")] == [0, 1, 2]
    assert run_.data.metrics["final.val_accuracy"] == pytest.approx(0.7)
    assert run_.data.tags["promotion.decision"] == "promoted"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_.info.run_id)]
    # the rejected run carries the comparison's numbers
    numbers = client.get_run(registry.worse.run_id).data.metrics
    for key in ("promotion.p_value", "promotion.mean_diff", "promotion.ci_low", "promotion.ci_high"):
        assert key in numbers


def test_model_version_has_signature_and_preprocessing(registry: Registry) -> None:
    from mlflow.models import Model

    from fabric.tracking import load_registered

    client = _client(registry.cfg)
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["promotion.decision"] == "promoted"
    folder = resolve_model(f"models:/{NAME}/1", registry.cfg)
    # the signature asks for the raw columns a client sends, not the encoded features
    sig = Model.load(str(folder.parents[1])).signature
    assert sig.inputs.input_names() == [*fx.NUMERIC, "color"]
    assert sig.outputs.input_names() == ["prediction", "proba_0", "proba_1"]
    model = load_registered(tracking_uri(registry.cfg), f"models:/{NAME}/1")
    assert model.preprocessor is not None and model.feature_names == registry.data.feature_names


def test_clearly_worse_candidate_is_not_promoted(registry: Registry) -> None:
    r = registry.worse
    assert (r.version, r.aliases, r.promoted, r.champion_version) == ("2", ["candidate"], False, "1")
    assert r.numbers["promotion.p_value"] < registry.cfg.track.promotion.alpha
    assert r.numbers["promotion.mean_diff"] > 0 and r.numbers["promotion.ci_low"] > 0
    assert "significantly worse" in r.decision
    assert _client(registry.cfg).get_model_version(NAME, "2").tags["promotion.decision"] == "rejected"


def test_equal_candidate_is_promoted(registry: Registry) -> None:
    r = registry.equal
    assert (r.version, r.aliases, r.promoted, r.champion_version) == ("3", ["candidate", "champion"], True, "3")
    assert r.numbers["promotion.mean_diff"] == pytest.approx(0.0, abs=1e-9)
    assert r.numbers["promotion.n"] == len(registry.data.y["test"])
    client = _client(registry.cfg)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "3"
    assert client.get_model_version(NAME, "1").aliases == []


def test_served_model_turns_raw_columns_into_predictions(registry: Registry) -> None:
    from fabric.tracking._registry import using_tracking_uri

    with using_tracking_uri(tracking_uri(registry.cfg)) as mlflow:
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = served.predict(registry.data.raw["test"])
    assert list(out.columns) == ["prediction", "proba_0", "proba_1"]
    assert (out["prediction"].to_numpy() == registry.data.y["test"]).mean() > 0.85
    # the same answers as the model on the encoded test split
    local = served.unwrap_python_model()
    expected = local.outputs(registry.data.x["test"]).argmax(axis=1)
    assert np.array_equal(out["prediction"].to_numpy(), expected)


def test_resolve_model(registry: Registry, tmp_path: Path) -> None:
    cfg = registry.cfg
    folder = resolve_model(f"models:/{NAME}@champion", cfg)
    assert {"model.pt", "model.json", "preprocessor.json"} <= {p.name for p in folder.iterdir()}
    assert folder == resolve_model(f"models:/{NAME}/3", cfg)  # one cached copy per version
    assert folder.is_relative_to(Path(cfg.run_dir).resolve() / "registry")
    assert resolve_model(folder, cfg) == folder  # a plain folder passes through
    assert resolve_model(folder.parents[1], cfg) == folder  # so does a downloaded MLflow model
    with pytest.raises(UsageError, match="cannot resolve"):
        resolve_model(f"models:/{NAME}@nope", cfg)
    with pytest.raises(UsageError, match="no model at"):
        resolve_model(tmp_path / "missing", cfg)
