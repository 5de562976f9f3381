"""An own PyTorch module with its own input signature: embeddings over categorical ids, beside the numbers.

fabric calls ``build(input_dim=..., output_dim=..., columns=..., **train.model_args)``; ``columns`` (asked for by
naming the parameter) maps each input column to its training categories, or to None for a numeric column.
The module's ``input_signature`` says what its ``forward`` takes instead of the flat feature vector:

- ``ids``: int64 ``[rows, n_categorical]``, ``i + 1`` for a column's ``i``-th training category, ``0`` for a
  null or a category never seen in training (hence ``len(categories) + 1`` rows per embedding table);
- ``numeric``: float32 ``[rows, n_numeric]``, scaled as fabric's preprocessing does.

fabric cuts these out of its feature matrix inside the model, so the ONNX export, the served model, batch
scoring and the registry's pyfunc take the same raw columns as for any other model.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingNet(nn.Module):
    """One embedding table per categorical column, concatenated with the numeric columns, then an MLP."""

    def __init__(self, columns: dict[str, list[str] | None], output_dim: int, dim: int, width: int) -> None:
        super().__init__()
        categorical = [c for c, cats in columns.items() if cats is not None]
        numeric = [c for c, cats in columns.items() if cats is None]
        self.input_signature = {
            "ids": {"columns": categorical, "as": "ids"},
            "numeric": {"columns": numeric},
        }
        sizes = [len(columns[c] or []) + 1 for c in categorical]  # + 1: id 0, a null or an unseen category
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        self.head = nn.Sequential(
            nn.Linear(dim * len(categorical) + len(numeric), width),
            nn.ReLU(),
            nn.Linear(width, output_dim),
        )

    def forward(self, ids: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        embedded = [table(ids[:, i]) for i, table in enumerate(self.embeddings)]
        return self.head(torch.cat([*embedded, numeric], dim=1))


def build(
    input_dim: int, output_dim: int, columns: dict[str, list[str] | None], dim: int = 4, width: int = 32
) -> nn.Module:
    """The embedding network; ``dim`` (embedding size) and ``width`` come from ``train.model_args``."""
    if not any(cats is not None for cats in columns.values()):
        raise ValueError("this module embeds categorical columns, and the data has none")
    return EmbeddingNet(columns, output_dim, int(dim), int(width))
