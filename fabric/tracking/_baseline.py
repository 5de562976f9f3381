"""The trivial baseline every trained model must beat: the training split's majority class, or its mean.

Its outputs have the shape of a model's (class logits, or one value per row), so ``score`` and
``per_row_loss`` treat both alike; the class logits are the log training frequencies, so the baseline's
accuracy is the majority class's and its log loss the class prior's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fabric.tracking._predict import LABEL, Task, score

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Baseline:
    """A constant predictor fitted on the training labels."""

    task: Task
    name: str
    """What it predicts, in words: ``the majority class (2)`` or ``the training mean (152.1)``."""
    row: np.ndarray
    """Its output for any row: log class frequencies, or the mean."""

    def outputs(self, rows: int) -> np.ndarray:
        """Its outputs for ``rows`` rows (what a model's forward pass would give)."""
        import numpy as np

        return np.tile(self.row, (rows, 1))

    def scores(self, labels: np.ndarray) -> dict[str, float]:
        """``score`` of the baseline on these labels."""
        return score(self.outputs(len(labels)), labels, self.task)


def fit_baseline(data: str | Path, task: Task, num_classes: int | None = None) -> Baseline:
    """The baseline of the ingested data folder ``data``, fitted on its ``train`` split's labels."""
    import numpy as np
    import pyarrow.parquet as pq

    labels = pq.read_table(Path(data) / "train", columns=[LABEL]).column(LABEL).to_numpy()
    if task == "classification":
        k = max(int(num_classes or 0), int(labels.max()) + 1 if len(labels) else 1)
        counts = np.bincount(labels.astype(np.int64), minlength=k).astype(np.float64)
        majority = int(counts.argmax())
        # Smoothed so an unseen class costs a large but finite log loss.
        freq = (counts + 1e-3) / (counts.sum() + 1e-3 * k)
        return Baseline(task, f"the majority class ({majority})", np.log(freq))
    mean = float(np.mean(labels.astype(np.float64))) if len(labels) else 0.0
    return Baseline(task, f"the training mean ({mean:.4g})", np.array([mean]))


def beats(model: dict[str, float], baseline: dict[str, float], task: Task) -> bool:
    """Does a model's ``score`` beat the baseline's? Higher accuracy (at equal accuracy: lower log loss),
    or lower RMSE."""
    if task == "classification":
        if model["accuracy"] != baseline["accuracy"]:
            return model["accuracy"] > baseline["accuracy"]
        return model["log_loss"] < baseline["log_loss"]
    return model["rmse"] < baseline["rmse"]
