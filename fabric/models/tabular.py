"""Tabular models: an MLP over the float feature columns the ingestion stage writes."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """``num_layers`` blocks of Linear → ReLU → Dropout, then a Linear head.

    The head emits ``output_dim`` values: class logits for classification, one value for regression.
    """

    def __init__(self, input_dim: int, output_dim: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)


def build_mlp(input_dim: int, output_dim: int, hidden_size: int = 64, num_layers: int = 2, dropout: float = 0.1) -> MLP:
    """Build the tabular MLP.

    Args:
        input_dim: number of feature columns.
        output_dim: ``num_classes`` for classification, 1 for regression.
        hidden_size: width of every hidden layer.
        num_layers: number of hidden layers (at least 1).
        dropout: dropout probability after each hidden layer.
    """
    sizes = {"input_dim": input_dim, "output_dim": output_dim, "hidden_size": hidden_size, "num_layers": num_layers}
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if not 0 <= dropout < 1:
        bad.append(f"dropout={dropout}")
    if bad:
        raise ValueError(f"build_mlp needs sizes >= 1 and 0 <= dropout < 1; got {', '.join(bad)}")
    return MLP(input_dim, output_dim, hidden_size, num_layers, dropout)
