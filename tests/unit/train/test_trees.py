"""Tree training's parts without Ray: library params per task, metric names, trial params, the default
search space, and the model folder's contract (``load_model`` → log-probabilities or values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fabric.config import load_config
from fabric.errors import ConfigError, FabricError
from fabric.models import load_model
from fabric.train._trees import fabric_metrics, library_params, tree_spec, with_trial

xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")


@pytest.mark.parametrize(
    ("framework", "task", "k", "objective", "metrics"),
    [
        ("xgboost", "classification", 2, "binary:logistic", ["error", "logloss"]),
        ("xgboost", "classification", 3, "multi:softprob", ["merror", "mlogloss"]),
        ("xgboost", "regression", None, "reg:squarederror", ["rmse"]),
        ("lightgbm", "classification", 2, "binary", ["binary_logloss", "binary_error"]),
        ("lightgbm", "classification", 4, "multiclass", ["multi_logloss", "multi_error"]),
        ("lightgbm", "regression", None, "regression", ["rmse"]),
    ],
)
def test_params_follow_the_task(framework: str, task: str, k: int | None, objective: str, metrics: list[str]) -> None:
    p = library_params(framework, task, k, {}, seed=7, threads=3)
    assert p["objective"] == objective
    assert p["eval_metric" if framework == "xgboost" else "metric"] == metrics
    assert p.get("num_class") == (k if k and k > 2 else None)
    assert p["seed"] == 7 and p["nthread" if framework == "xgboost" else "num_threads"] == 3


def test_config_params_win_and_a_classifier_must_give_probabilities() -> None:
    p = library_params("xgboost", "regression", None, {"objective": "reg:absoluteerror", "max_depth": 3}, 0, 1)
    assert p["objective"] == "reg:absoluteerror" and p["max_depth"] == 3
    with pytest.raises(FabricError, match="multi:softmax.*does not give class probabilities"):
        library_params("xgboost", "classification", 3, {"objective": "multi:softmax"}, 0, 1)
    with pytest.raises(FabricError, match="unknown tree framework"):
        library_params("catboost", "regression", None, {}, 0, 1)


def test_library_metrics_get_fabrics_names() -> None:
    got = fabric_metrics({"train-mlogloss": 0.5, "val-merror": 0.25, "val-mlogloss": 0.7, "val-auc": 0.9})
    assert got == {"train_loss": 0.5, "val_accuracy": 0.75, "val_loss": 0.7, "val_auc": 0.9}
    reg = fabric_metrics({"val-rmse": 3.0, "train-l2": 4.0, "val-ndcg@5": 0.1})
    assert reg == {"val_rmse": 3.0, "val_loss": 9.0, "train_loss": 4.0, "val_ndcg_5": 0.1}


def test_a_trial_sets_library_params_and_rounds() -> None:
    base = {"framework": "xgboost", "params": {"max_depth": 6}, "num_boost_round": 100}
    out = with_trial(base, {"xgboost.max_depth": np.int64(3), "xgboost.eta": 0.1, "num_boost_round": 40.0})
    assert out["params"] == {"max_depth": 3, "eta": 0.1} and type(out["params"]["max_depth"]) is int
    assert out["num_boost_round"] == 40 and base["params"] == {"max_depth": 6}  # the base is left alone
    with pytest.raises(FabricError, match="lightgbm.num_leaves.*framework xgboost"):
        with_trial(base, {"lightgbm.num_leaves": 7})


def test_tree_search_space_defaults_and_checks() -> None:
    from fabric.tune._search import TREE_SPACES, search_space

    assert search_space(load_config(None, ["train.framework=lightgbm"])) == TREE_SPACES["lightgbm"]
    mlp = load_config(None, [])
    assert search_space(mlp) == mlp.tune.search_space
    rounds = "tune.search_space={num_boost_round: {type: int, low: 10, high: 50}}"
    own = load_config(None, ["train.framework=xgboost", rounds])
    assert set(search_space(own)) == {"num_boost_round"}
    space = "{lr: {type: uniform, low: 0.1, high: 0.2}, lightgbm.num_leaves: {type: int, low: 3, high: 9}}"
    wrong = load_config(None, ["train.framework=xgboost", f"tune.search_space={space}"])
    with pytest.raises(ConfigError) as e:
        search_space(wrong)
    assert [p.path for p in e.value.problems] == ["tune.search_space.lightgbm.num_leaves", "tune.search_space.lr"]


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
@pytest.mark.parametrize(("task", "k"), [("classification", 2), ("classification", 3), ("regression", None)])
def test_load_model_gives_a_module_with_fabrics_output_contract(
    tmp_path: Path, framework: str, task: str, k: int | None
) -> None:
    from tests.unit.export.test_trees_onnx import FEATURES, _data, tree_folder

    folder = tree_folder(tmp_path, framework, task, k, rounds=5)
    module, spec = load_model(folder)
    assert isinstance(module, torch.nn.Module) and not module.training
    assert spec["kwargs"] == {"input_dim": len(FEATURES), "output_dim": k or 1}
    x, _ = _data(task, k, rows=30)
    out = module(torch.from_numpy(x))
    assert out.dtype == torch.float32 and out.shape == (30, k or 1)
    if task == "classification":  # log-probabilities: each row's probabilities sum to one
        assert torch.allclose(out.exp().sum(dim=1), torch.ones(30), atol=1e-5)


def test_an_incomplete_tree_folder_says_what_is_missing(tmp_path: Path) -> None:
    from fabric.models import write_spec

    config = {"framework": "lightgbm", "task": "regression", "feature_names": ["a"], "num_classes": None}
    write_spec(tmp_path, tree_spec(config, {}, 3, 3))
    with pytest.raises(FabricError, match="no model.txt"):
        load_model(tmp_path)


def _rows(values: list[float], metric: str = "val_loss") -> list[dict[str, float]]:
    return [{"epoch": i + 1, metric: v} for i, v in enumerate(values)]


def _stopped_at(losses: list[float], patience: int, raw: str = "val-logloss") -> int | None:
    from fabric.train._trees import _Rounds

    rounds = _Rounds([], total=100, rank=1, say=False, patience=patience)
    for v in losses:
        rounds.add({raw: v})
        if rounds.stop is not None:
            break
    return rounds.stop


def test_early_stopping_keeps_the_best_round_once_patience_runs_out() -> None:
    losses = [0.9, 0.7, 0.6, 0.65, 0.61]
    assert _stopped_at(losses, patience=3) is None
    assert _stopped_at([*losses, 0.62, 0.5], patience=3) == 3  # stops at round 6, before 0.5 comes
    assert _stopped_at([0.5, 0.3, 0.4], patience=1, raw="val-error") == 2  # accuracy 0.7 is the best
    assert _stopped_at([0.5, 0.3, 0.4], patience=2, raw="val-error") is None
    assert _stopped_at([0.5, 0.7, 0.6], patience=1, raw="val-auc") == 2  # higher is better


def test_a_resumed_run_counts_patience_from_the_rounds_before_the_restart() -> None:
    from fabric.train._trees import _Rounds

    # rounds 1-5 come from the checkpoint: the best was round 3, two rounds without progress since
    rounds = _Rounds(_rows([0.9, 0.7, 0.6, 0.65, 0.61]), total=20, rank=1, say=False, patience=3)
    rounds.add({"train-mlogloss": 0.5, "val-merror": 0.2, "val-mlogloss": 0.62})
    assert rounds.watched == ("val_loss", False)  # XGBoost's rule: the val split's last metric
    assert rounds.stop == 3 and rounds.history[-1]["resumed_from_round"] == 5
    lightgbm = _Rounds([], total=20, rank=1, say=False, patience=1, watch_first=True)
    lightgbm.add({"val-multi_error": 0.3, "val-multi_logloss": 0.7})
    lightgbm.add({"val-multi_error": 0.4, "val-multi_logloss": 0.6})
    assert lightgbm.watched == ("val_accuracy", True) and lightgbm.stop == 1
