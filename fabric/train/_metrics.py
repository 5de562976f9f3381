"""Loss, per-epoch sums that all-reduce across workers, the metrics they give, and the epoch line."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

Task = Literal["classification", "regression"]


def compute_loss(task: Task, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits (classification) or mean squared error on the one output (regression)."""
    if task == "classification":
        return F.cross_entropy(output, label)
    return F.mse_loss(output.squeeze(-1), label)


class EpochSums:
    """Sums over an epoch's batches: loss x rows, rows, and correct predictions or squared error.

    Sums (not means) so that workers' shards of different sizes combine exactly with one all-reduce.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.loss = 0.0
        self.rows = 0
        self.hits = 0.0  # classification: correct predictions; regression: sum of squared errors

    def add(self, output: torch.Tensor, label: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one batch (``loss`` is that batch's mean loss)."""
        n = int(label.shape[0])
        self.loss += float(loss.detach()) * n
        self.rows += n
        with torch.no_grad():
            if self.task == "classification":
                self.hits += float((output.argmax(dim=-1) == label).sum())
            else:
                self.hits += float(((output.squeeze(-1) - label) ** 2).sum())

    def all_reduce(self) -> EpochSums:
        """Sum across the worker group (a no-op on one process) and return self."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.loss, float(self.rows), self.hits], dtype=torch.float64)
            if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
                t = t.cuda()
            dist.all_reduce(t)
            self.loss, rows, self.hits = (float(v) for v in t.cpu())
            self.rows = int(round(rows))
        return self

    @property
    def mean_loss(self) -> float:
        return self.loss / self.rows if self.rows else math.nan

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}_loss`` plus ``{prefix}_accuracy`` (classification) or ``{prefix}_rmse`` (regression)."""
        out = {f"{prefix}_loss": self.mean_loss}
        if self.task == "classification":
            out[f"{prefix}_accuracy"] = self.hits / self.rows if self.rows else math.nan
        else:
            out[f"{prefix}_rmse"] = math.sqrt(self.hits / self.rows) if self.rows else math.nan
        return out


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """The line rank 0 prints after each epoch, e.g.
    ``epoch 3/10  train_loss 0.412  val_loss 0.398  val_accuracy 0.871  (2.1s)``."""
    shown = ("train_loss", "val_loss", "val_accuracy", "val_rmse")
    parts = [f"epoch {metrics['epoch']}/{epochs}"]
    parts += [f"{k} {metrics[k]:.4f}" for k in shown if k in metrics]
    if "epoch_s" in metrics:
        parts.append(f"({metrics['epoch_s']:.1f}s)")
    return "  ".join(parts)
