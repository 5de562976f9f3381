"""Gradient-boosted trees through the whole lifecycle on a real local Ray, MLflow and Serve.

XGBoost on multi-class data (``builtin:wine``): ingest, a 2-trial search, training on 2 Ray Train workers,
registration, ONNX export with its parity check, the drift monitor and the OIP v2 app; the registry's
pyfunc champion predicts what the app serves. LightGBM on regression (``builtin:diabetes``): trained on 2
workers of which one is lost mid-run (the run resumes from its last checkpoint), then the pipeline of the same
config takes that run as its training and registers, exports and serves its model. A rerun of the XGBoost
pipeline has nothing to do and registers nothing new. One Ray (on Serve's fast path) and one Serve for the
module; three Ray Train runs in all (a fit costs tens of seconds here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from fabric.config import PipelineConfig, load_config
from fabric.runtime import free_port
from fabric.train import TrainResult
from tests.unit.serve.serving import fast_path_ray, wait_for

pytestmark = pytest.mark.integration
pytest.importorskip("xgboost")
pytest.importorskip("lightgbm")
pytest.importorskip("onnxmltools")

MONITOR = "test-trees-monitor"


def _cfg(root: Path, framework: str, *extra: str) -> PipelineConfig:
    common = [
        f"name=trees-{framework}",
        f"run_dir={root / framework}",
        f"track.model_name=trees-{framework}",
        f"track.experiment=trees-{framework}",
        f"train.framework={framework}",
        "train.num_workers=2",
        "train.num_boost_round=20",
        "train.checkpoint_every=5",
        "serve.enabled=true",
        f"serve.port={free_port()}",
        "serve.replica_cpus=0",
    ]
    return load_config(None, [*common, *extra])


def _boost_losing_a_worker(cfg: PipelineConfig, marker: Path) -> TrainResult:
    """Ingest ``cfg``'s data, then train it with rank 1's process exiting at round 7 (once: ``marker`` guards
    it), after the checkpoint of round 5: the worker group restarts and resumes from that checkpoint."""
    from fabric import data
    from fabric.train._trees import run

    data.run(cfg)
    return run(cfg, loop_overrides={"fault_injection": {"round": 7, "rank": 1, "marker": str(marker)}})


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both pipelines, run once on one Ray: XGBoost (wine, searched, monitored) and LightGBM (diabetes), whose
    training ran first, through a lost worker: the pipeline finds that run done and uses its model."""
    from fabric import pipeline

    root = tmp_path_factory.mktemp("trees")
    with fast_path_ray(root / "home"):
        xgb = _cfg(
            root,
            "xgboost",
            "data.source=builtin:wine",
            "tune.num_samples=2",
            "tune.max_concurrent_trials=2",
            "monitor.enabled=true",
            f"monitor.actor_name={MONITOR}",
            "monitor.detached=false",
        )
        lgb = _cfg(
            root,
            "lightgbm",
            "data.source=builtin:diabetes",
            "data.task=regression",
            "tune.enabled=false",
            "monitor.enabled=false",
            "serve.app_name=lgb",
            "serve.route_prefix=/lgb",
            "train.early_stopping_rounds=null",  # all 20 rounds: the resumed run's history is complete
        )
        xgb_result = pipeline.run(xgb)
        crashed = _boost_losing_a_worker(lgb, root / "crashed")
        yield {
            "xgb": (xgb, xgb_result),
            "lgb": (lgb, pipeline.run(lgb)),
            "crashed": (root / "crashed", crashed),
            "root": root,
        }


def _raw_rows(cfg: PipelineConfig, n: int) -> list[dict[str, Any]]:
    """Rows as a client sends them: raw columns of the run's reference sample."""
    frame = pd.read_parquet(Path(cfg.run_dir) / "data" / "reference.parquet").head(n)
    return json.loads(frame.to_json(orient="records"))


def _infer(result: Any, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    serve = result.stages["serve"]
    r = httpx.post(f"{serve.url}/v2/models/{serve.model_name}/infer", json={"instances": rows}, timeout=60)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def _champion(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """What ``mlflow.pyfunc.load_model("models:/<name>@champion")`` predicts."""
    import mlflow

    from fabric.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    model = mlflow.pyfunc.load_model(f"models:/{cfg.track.model_name}@champion")
    return model.predict(pd.DataFrame(rows))


def test_xgboost_multiclass_goes_through_every_stage(lifecycle: dict[str, Any]) -> None:
    cfg, result = lifecycle["xgb"]
    assert list(result.stages) == ["ingest", "tune", "train", "register", "export", "monitor", "serve"]
    tuned = result.stages["tune"]
    assert tuned.num_trials == 2 and tuned.best_config and all(k.startswith("xgboost.") for k in tuned.best_config)
    trained = result.stages["train"]
    assert 1 <= len(trained.history) <= 20 and {"train_loss", "val_loss", "val_accuracy"} <= set(trained.history[-1])
    assert trained.metrics["test_accuracy"] > trained.metrics["baseline_test_accuracy"]
    spec = json.loads((trained.model_path / "model.json").read_text())
    assert spec["framework"] == "xgboost" and spec["num_classes"] == 3 and (trained.model_path / "model.ubj").is_file()
    assert spec["params"]["objective"] == "multi:softprob"
    assert all(spec["params"][k.split(".", 1)[1]] == pytest.approx(v) for k, v in tuned.best_config.items())
    registered = result.stages["register"]
    assert registered.promoted and registered.champion_version == registered.version == "1"
    exported = result.stages["export"]
    assert exported.parity_data == "test split" and exported.max_abs_diff <= cfg.export.tolerance
    assert json.loads(exported.report_path.read_text())["framework"] == "xgboost"


def test_served_xgboost_answers_as_the_registered_champion_and_feeds_the_monitor(lifecycle: dict[str, Any]) -> None:
    import ray

    from fabric.monitor import get_actor

    cfg, result = lifecycle["xgb"]
    rows = _raw_rows(cfg, 12)
    served = _infer(result, rows)
    assert served["probabilities"].shape == (12, 3)
    champion = _champion(cfg, rows)
    np.testing.assert_array_equal(served["label"], champion["prediction"].to_numpy())
    proba = champion[[f"proba_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose(served["probabilities"], proba, atol=1e-5)
    handle = get_actor(MONITOR)
    assert handle is not None
    wait_for(lambda: ray.get(handle.stats.remote(), timeout=30)["received"] >= len(rows), what="rows at the monitor")


def test_lightgbm_regression_trains_registers_exports_and_serves(lifecycle: dict[str, Any]) -> None:
    cfg, result = lifecycle["lgb"]
    _, crashed = lifecycle["crashed"]
    assert list(result.stages) == ["ingest", "train", "register", "export", "serve"]
    trained = result.stages["train"]
    # the pipeline's training is the run the fixture trained (through a lost worker): nothing left to do
    assert trained.run_key == crashed.run_key and trained.trained_epochs == 0
    assert {"train_loss", "val_loss", "val_rmse"} <= set(trained.history[-1])
    assert trained.metrics["test_rmse"] < trained.metrics["baseline_test_rmse"]
    assert json.loads((trained.model_path / "model.json").read_text())["framework"] == "lightgbm"
    assert result.stages["register"].promoted
    assert result.stages["export"].max_abs_diff <= cfg.export.tolerance
    rows = _raw_rows(cfg, 10)
    served = _infer(result, rows)["prediction"].reshape(-1)
    np.testing.assert_allclose(served, _champion(cfg, rows)["prediction"].to_numpy(), rtol=1e-5)


def test_a_rerun_has_nothing_to_do_and_registers_nothing(
    lifecycle: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric import pipeline

    cfg, first = lifecycle["xgb"]
    again = pipeline.run(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"enabled": False})}))
    assert again.stages["train"].trained_epochs == 0
    assert again.stages["train"].run_key == first.stages["train"].run_key
    registered = again.stages["register"]
    assert registered.registered is False and registered.version == first.stages["register"].version
    out = capsys.readouterr().out
    assert "training: nothing to do" in out and "nothing new to register" in out


def test_a_worker_lost_mid_run_resumes_from_the_last_checkpoint(lifecycle: dict[str, Any]) -> None:
    cfg, _ = lifecycle["lgb"]
    marker, result = lifecycle["crashed"]
    assert (cfg.train.num_boost_round, cfg.train.checkpoint_every, cfg.train.early_stopping_rounds) == (20, 5, None)
    assert marker.read_text().startswith("worker rank 1 exited at round 7")
    # rounds 1-5 come from the checkpoint the restart resumed from, 6-20 were boosted after it
    assert [int(r["epoch"]) for r in result.history] == list(range(1, 21))
    # resumed, not restarted from scratch: the rounds after the restart started from round 5's checkpoint
    assert [r["resumed_from_round"] for r in result.history] == [0] * 5 + [5] * 15
    assert result.trained_epochs == 20 and result.metrics["best_iteration"] == 20
    assert json.loads((result.model_path / "model.json").read_text())["num_boost_round"] == 20
