"""Tree models in the registry (real MLflow sqlite store): registered as fabric's pyfunc under the same aliases,
the booster also logged with MLflow's own flavour, and both predict what the booster predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fabric.config import load_config
from fabric.models import write_spec
from fabric.models.trees import BOOSTER_FILES
from fabric.tracking import run, tracking_uri
from fabric.train._trees import library_params, tree_spec
from tests.unit.tracking import fixtures as fx

pytest.importorskip("xgboost")
pytest.importorskip("lightgbm")


def _tree_model(folder: Path, data: fx.Dataset, framework: str) -> tuple[Path, object]:
    import lightgbm
    import xgboost

    k = 2 if data.task == "classification" else None
    params = library_params(framework, data.task, k, {}, seed=0, threads=1)
    x, y = data.x["train"], data.y["train"]
    if framework == "xgboost":
        booster = xgboost.train(params, xgboost.DMatrix(x, label=y), 20)
    else:
        booster = lightgbm.train({**params, "min_data_in_leaf": 5}, lightgbm.Dataset(x, label=y), 20)
    folder.mkdir(parents=True)
    booster.save_model(str(folder / BOOSTER_FILES[framework]))
    config = {"framework": framework, "task": data.task, "feature_names": data.feature_names, "num_classes": k,
              "target": fx.TARGET}  # fmt: skip
    write_spec(folder, tree_spec(config, params, 20, 20))
    return folder, booster


@pytest.mark.parametrize(("framework", "task"), [("xgboost", "classification"), ("lightgbm", "regression")])
def test_a_tree_model_registers_with_its_native_flavour_too(tmp_path: Path, framework: str, task: str) -> None:
    import mlflow

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"track.model_name=trees-{framework}", f"data.task={task}"])
    data = fx.make_data(cfg.run_dir, task=task)
    folder, booster = _tree_model(tmp_path / "model", data, framework)
    result = run(cfg, fx.train_result(folder))
    assert result.promoted and result.aliases == ["candidate", "champion"]

    mlflow.set_tracking_uri(tracking_uri(cfg))
    raw = data.raw["test"].head(20)
    served = mlflow.pyfunc.load_model(f"models:/trees-{framework}@champion").predict(raw)
    x = data.x["test"][:20]
    if framework == "xgboost":
        import xgboost

        p1 = booster.predict(xgboost.DMatrix(x))  # type: ignore[attr-defined]
        np.testing.assert_allclose(served["proba_1"].to_numpy(), p1, atol=1e-6)
        np.testing.assert_array_equal(served["prediction"].to_numpy(), (p1 > 0.5).astype(int))
    else:
        expected = booster.predict(x)  # type: ignore[attr-defined]
        np.testing.assert_allclose(served["prediction"].to_numpy(), expected, rtol=1e-6)

    native = getattr(mlflow, framework).load_model(f"runs:/{result.run_id}/{framework}")
    if framework == "xgboost":
        import xgboost

        np.testing.assert_allclose(native.predict(xgboost.DMatrix(x)), p1, atol=1e-6)
    else:
        np.testing.assert_allclose(native.predict(x), booster.predict(x), rtol=1e-6)  # type: ignore[attr-defined]
    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/trees-{framework}/1/requirements.txt"))
    assert framework in requirements.read_text()
    assert isinstance(served, pd.DataFrame)
