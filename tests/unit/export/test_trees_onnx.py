"""ONNX export of XGBoost and LightGBM model folders: graph shape, parity with the booster, the output contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fabric.export import ParityError, check_parity, export_folder, ort_outputs, session
from fabric.models import load_model, write_spec
from fabric.models.trees import BOOSTER_FILES, EPS, TreeModel
from fabric.train._trees import library_params, tree_spec

xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")
pytest.importorskip("onnxmltools")

FEATURES = [f"col_{i}" for i in range(5)]
CASES = [("classification", 2), ("classification", 3), ("regression", None)]


def _data(task: str, k: int | None, rows: int = 400, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, len(FEATURES))).astype(np.float32)
    if task == "regression":
        return x, (scale * (50 * x[:, 0] + 20 * x[:, 1] ** 2 + 150)).astype(np.float32)
    edges = [0.0] if k == 2 else [-0.5, 0.5]
    return x, np.digitize(x[:, 0] + 0.5 * x[:, 1], edges).astype(np.int64)


def tree_folder(tmp: Path, framework: str, task: str, k: int | None, rounds: int = 15, scale: float = 1.0) -> Path:
    """A model folder as the training stage writes it, from a booster trained here (regression targets
    around ``150 * scale``)."""
    x, y = _data(task, k, scale=scale)
    params = library_params(framework, task, k, {"max_depth": 3} if framework == "xgboost" else {"num_leaves": 7}, 0, 1)
    folder = tmp / f"{framework}-{task}-{k}"
    folder.mkdir()
    if framework == "xgboost":
        booster = xgboost.train(params, xgboost.DMatrix(x, label=y, feature_names=FEATURES), rounds)
    else:
        booster = lightgbm.train(params, lightgbm.Dataset(x, label=y, feature_name=FEATURES), rounds)
    booster.save_model(str(folder / BOOSTER_FILES[framework]))
    config = {"framework": framework, "task": task, "feature_names": FEATURES, "num_classes": k, "target": "y"}
    write_spec(folder, tree_spec(config, params, rounds, rounds))
    return folder


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
@pytest.mark.parametrize(("task", "k"), CASES, ids=["binary", "multiclass", "regression"])
def test_tree_onnx_matches_the_booster(tmp_path: Path, framework: str, task: str, k: int | None) -> None:
    folder = tree_folder(tmp_path, framework, task, k)
    module, spec = load_model(folder)
    assert isinstance(module, TreeModel) and spec["framework"] == framework
    x, y = _data(task, k, rows=200)
    path = export_folder(folder, tmp_path / "m.onnx", 18)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["features"]
    assert [o.name for o in sess.get_outputs()] == ["output"]  # one output: no label, no ZipMap
    ours = module(torch.from_numpy(x)).numpy()
    onnx_out = ort_outputs(sess, x)
    assert ours.shape == onnx_out.shape == (len(x), k or 1)
    assert check_parity(module, sess, x, 1e-4) <= 1e-4
    if task == "classification":
        # log-probabilities: softmax gives the booster's own probabilities back
        p = torch.softmax(torch.from_numpy(ours), dim=1).numpy()
        booster = module.booster
        raw = booster.predict(xgboost.DMatrix(x, feature_names=FEATURES) if framework == "xgboost" else x)
        raw = np.stack([1 - raw, raw], axis=1) if raw.ndim == 1 else raw
        assert np.allclose(p, raw, atol=1e-5)
        assert (p.argmax(1) == y).mean() > 0.8
        assert ours.max() <= 0 and ours.min() >= np.log(EPS) - 1e-3
    else:
        assert np.sqrt(((ours[:, 0] - y) ** 2).mean()) < y.std()


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_tree_regression_parity_is_relative_to_the_values_scale(tmp_path: Path, framework: str) -> None:
    """House-price-sized targets: float32 sums in ONNX Runtime differ by more than 1e-4 in absolute terms."""
    from fabric.export._trees import check_tree_parity

    folder = tree_folder(tmp_path, framework, "regression", None, scale=5000.0)
    module, _ = load_model(folder)
    sess = session(export_folder(folder, tmp_path / "m.onnx"))
    x, _ = _data("regression", None, rows=300)
    assert check_tree_parity(module, sess, x, 1e-4, "regression") <= 1e-4
    with pytest.raises(ParityError):  # a model that is off by a hundredth of its scale still fails
        drifted = type(module)(module.booster, module.framework, "regression")
        drifted.predict_numpy = lambda v: module.predict_numpy(v) * 1.01  # type: ignore[method-assign]
        check_tree_parity(drifted, sess, x, 1e-4, "regression")


def test_parity_check_catches_a_different_model(tmp_path: Path) -> None:
    a = tree_folder(tmp_path, "xgboost", "classification", 3, rounds=15)
    (tmp_path / "b").mkdir()
    b = tree_folder(tmp_path / "b", "xgboost", "classification", 3, rounds=3)
    module, _ = load_model(a)
    sess = session(export_folder(b, tmp_path / "b.onnx", 18))
    x, _ = _data("classification", 3, rows=50)
    with pytest.raises(ParityError):
        check_parity(module, sess, x, 1e-4)


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_both_serving_engines_run_a_tree_folder_alike(tmp_path: Path, framework: str) -> None:
    """The ONNX engine on ``onnx_for`` (exported once, beside the model) and the torch engine on the wrapper."""
    from fabric.export import onnx_for
    from fabric.serve.engines import OnnxEngine, TorchEngine

    folder = tree_folder(tmp_path, framework, "classification", 3)
    onnx_path = onnx_for(folder)
    assert onnx_path == folder / "model.onnx" and onnx_for(folder) == onnx_path  # the second call reuses it
    engines = [OnnxEngine(onnx_path, len(FEATURES)), TorchEngine(folder, len(FEATURES))]
    x, _ = _data("classification", 3, rows=64)
    outs = []
    for engine in engines:
        engine.start()
        engine.check_health()
        outs.append(engine.predict(x))
        engine.shutdown()
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
