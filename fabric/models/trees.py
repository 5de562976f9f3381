"""Gradient-boosted trees (XGBoost, LightGBM) behind a torch module's interface.

The training stage writes a tree model folder: ``model.json`` (``framework``, task, feature_names, num_classes,
the library's params, the best iteration) and the booster file (:data:`BOOSTER_FILES`). :func:`load_trees`
wraps the booster in a :class:`TreeModel`, a ``torch.nn.Module`` whose ``forward`` follows every fabric
model's output contract, so the registry's pyfunc, the torch serving engine and the training summary use
trees unchanged:

* classification: log-probabilities ``[n, num_classes]`` (binary included), so that the softmax fabric
  applies downstream gives back the booster's probabilities;
* regression: the predicted values ``[n, 1]``.

The ONNX export (``fabric.export``) computes exactly the same: ``log(max(p, EPS))`` in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fabric.errors import FabricError, require

FRAMEWORKS = ("xgboost", "lightgbm")
BOOSTER_FILES = {"xgboost": "model.ubj", "lightgbm": "model.txt"}
"""The booster file of each framework, in checkpoints and in the model folder (Ray Train's callbacks' names)."""
EPS = 1e-7
"""Probabilities are clipped to at least this before the log (float32: no ``-inf`` for a certain class)."""


def load_booster(framework: str, path: str | Path) -> Any:
    """Read a booster file written by ``xgboost.Booster.save_model`` or ``lightgbm.Booster.save_model``."""
    if framework == "xgboost":
        xgboost = require("xgboost", "gbdt")
        booster = xgboost.Booster()
        booster.load_model(str(path))
        return booster
    if framework == "lightgbm":
        lightgbm = require("lightgbm", "gbdt")
        return lightgbm.Booster(model_file=str(path))
    raise FabricError(f"unknown tree framework {framework!r}; known: {', '.join(FRAMEWORKS)}")


def probabilities_or_values(booster: Any, framework: str, task: str, x: np.ndarray) -> np.ndarray:
    """The booster's own predictions, float32: class probabilities ``[n, k]`` (binary: ``[1 - p, p]``) or
    values ``[n, 1]``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if framework == "xgboost":
        raw = booster.inplace_predict(x, validate_features=False)
    else:
        raw = booster.predict(x)
    out = np.asarray(raw, dtype=np.float32)
    if task == "classification":
        if out.ndim == 1:  # binary objectives give P(class 1)
            out = np.stack([np.float32(1.0) - out, out], axis=1)
        return out
    return out.reshape(len(x), 1)


def to_outputs(predictions: np.ndarray, task: str) -> np.ndarray:
    """fabric's output contract from the booster's predictions: ``log(max(p, EPS))`` or the values."""
    if task == "classification":
        return np.log(np.maximum(predictions, np.float32(EPS)))
    return predictions


class TreeModel(nn.Module):
    """A booster as a module: ``forward(x [n, features] float32) -> [n, outputs]`` (log-probabilities or values).

    It has no parameters; ``forward`` runs the booster on CPU (numpy) and returns a tensor on ``x``'s device.
    """

    def __init__(self, booster: Any, framework: str, task: str) -> None:
        super().__init__()
        self.booster = booster
        self.framework = framework
        self.task = task

    def predict_numpy(self, x: np.ndarray) -> np.ndarray:
        """The module's outputs for a numpy matrix, without torch."""
        return to_outputs(probabilities_or_values(self.booster, self.framework, self.task, x), self.task)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.predict_numpy(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(out).to(x.device)


def load_trees(
    folder: str | Path, spec: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[TreeModel, dict[str, Any]]:
    """Load a tree model folder (``model.json`` + booster file) as a :class:`TreeModel` in eval mode.

    Args:
        folder: the model folder.
        spec: its ``model.json`` (``framework``, ``task``, ``booster_file``...).
        device: where ``forward`` puts its outputs (the booster itself predicts on CPU).

    Raises:
        FabricError: an unknown framework or a missing booster file.
        MissingExtraError: xgboost/lightgbm (extra ``gbdt``) is not installed.
    """
    framework = str(spec.get("framework"))
    if framework not in FRAMEWORKS:
        raise FabricError(f"{folder}/model.json names framework {framework!r}; known: torch, {', '.join(FRAMEWORKS)}")
    path = Path(folder) / str(spec.get("booster_file") or BOOSTER_FILES[framework])
    if not path.is_file():
        raise FabricError(f"no {path.name} in {folder}: the {framework} model folder is incomplete")
    model = TreeModel(load_booster(framework, path), framework, str(spec.get("task", "classification")))
    return model.to(device).eval(), spec
