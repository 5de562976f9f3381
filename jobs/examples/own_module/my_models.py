"""An own PyTorch module for fabric: a residual MLP over the feature vector.

fabric calls ``build(input_dim=..., output_dim=..., **train.model_args)`` and trains what it returns with its
own loop (DDP or DeepSpeed, checkpoints, resume). The module takes ``[rows, input_dim]`` float32 features and
gives ``[rows, output_dim]``: class logits, or one value for regression. Keep it in one file (or one package):
fabric copies it into the model folder, so serving and the registry's pyfunc rebuild it anywhere.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """x + MLP(LayerNorm(x)): a pre-norm residual block."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, 2 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLP(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, width: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.stem = nn.Linear(input_dim, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout) for _ in range(blocks)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build(input_dim: int, output_dim: int, width: int = 64, blocks: int = 2, dropout: float = 0.1) -> nn.Module:
    """The residual MLP; ``width``, ``blocks`` and ``dropout`` come from ``train.model_args``."""
    return ResidualMLP(input_dim, output_dim, int(width), int(blocks), float(dropout))
