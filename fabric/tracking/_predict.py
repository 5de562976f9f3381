"""Model outputs to predictions, per-row losses and scores; reading a split of the run's data folder.

numpy/pandas only, shared by the pyfunc model, promotion and export's int8 check, so they all agree on
what "accuracy" and "loss" mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fabric import storage
from fabric.errors import FabricError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

Task = Literal["classification", "regression"]
LABEL = "label"
_EPS = 1e-12


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """Class probabilities from logits: softmax over ``(n, k)``; a single logit column is a binary sigmoid."""
    import numpy as np

    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1 or out.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-out.reshape(-1)))
        return np.stack([1.0 - p1, p1], axis=1)
    shifted = out - out.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def point_predictions(outputs: np.ndarray, task: Task) -> np.ndarray:
    """Class indices (classification) or values (regression)."""
    import numpy as np

    if task == "classification":
        return probabilities(outputs).argmax(axis=1)
    return np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]


def per_row_loss(outputs: np.ndarray, labels: np.ndarray, task: Task) -> np.ndarray:
    """Each row's loss: cross-entropy of the true class, or squared error. Paired tests compare these."""
    import numpy as np

    y = np.asarray(labels)
    if task == "classification":
        p = probabilities(outputs)
        idx = y.astype(np.int64)
        return -np.log(np.clip(p[np.arange(len(idx)), idx], _EPS, 1.0))
    return (point_predictions(outputs, task) - y.astype(np.float64)) ** 2


def score(outputs: np.ndarray, labels: np.ndarray, task: Task) -> dict[str, float]:
    """``accuracy`` and ``log_loss`` (classification) or ``rmse`` and ``mae`` (regression)."""
    import numpy as np

    y = np.asarray(labels)
    if task == "classification":
        acc = float((point_predictions(outputs, task) == y.astype(np.int64)).mean())
        return {"accuracy": acc, "log_loss": float(per_row_loss(outputs, y, task).mean())}
    err = point_predictions(outputs, task) - y.astype(np.float64)
    return {"rmse": float(np.sqrt((err**2).mean())), "mae": float(np.abs(err).mean())}


def headline(task: Task) -> tuple[str, bool]:
    """The metric a change is reported in and whether higher is better."""
    return ("accuracy", True) if task == "classification" else ("rmse", False)


def predictions_frame(outputs: np.ndarray, task: Task) -> pd.DataFrame:
    """What the served model answers: ``prediction`` and, for classification, ``proba_<k>`` per class."""
    import pandas as pd

    frame = pd.DataFrame({"prediction": point_predictions(outputs, task)})
    if task == "classification":
        p = probabilities(outputs)
        for k in range(p.shape[1]):
            frame[f"proba_{k}"] = p[:, k]
    return frame


def data_dir(run_dir: str | Path) -> Path:
    """The ingestion stage's output folder ``<run_dir>/data``, local (a URI run_dir's is pulled: fabric.storage)."""
    return storage.pull(run_dir, "data", "meta.json")


def read_split(
    data: str | Path, split: str, feature_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (float32, in ``feature_names`` order), labels and the feature names of one split.

    Args:
        data: the data folder (``<run_dir>/data``) with ``<split>/`` parquet and ``meta.json``.
        split: ``train``, ``val`` or ``test``.
        feature_names: columns to read; None takes ``meta.json``'s ``feature_names``.

    Raises:
        FabricError: the split is missing, or lacks a feature column or the label.
    """
    import numpy as np
    import pandas as pd

    folder = Path(data) / split
    if not folder.exists():
        raise FabricError(f"no {split} split at {folder}: run the ingestion stage first")
    if feature_names is None:
        meta_path = Path(data) / "meta.json"
        if not meta_path.is_file():
            raise FabricError(f"no meta.json in {data}: cannot tell the feature columns")
        feature_names = list(json.loads(meta_path.read_text())["feature_names"])
    frame = pd.read_parquet(folder)
    missing = [c for c in [*feature_names, LABEL] if c not in frame.columns]
    if missing:
        raise FabricError(f"the {split} split at {folder} lacks column(s) {missing}")
    return frame[feature_names].to_numpy(np.float32), frame[LABEL].to_numpy(), list(feature_names)
