"""Config of tracking and the model registry (MLflow, W&B)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fabric.config._base import Section


class WandbConfig(Section):
    """Weights & Biases logging; offline by default so nothing leaves the machine."""

    enabled: bool = False
    project: str = "fabric"
    mode: Literal["offline", "online", "disabled"] = "offline"


class PromotionConfig(Section):
    """How a candidate is compared with the champion before promotion."""

    alpha: float = Field(default=0.05, gt=0, lt=1)
    """Significance level of the paired test."""
    bootstrap_samples: int = Field(default=1000, ge=100)


class TrackConfig(Section):
    """Where runs and models are recorded."""

    tracking_uri: str | None = None
    """MLflow tracking URI; None means a sqlite store under ``run_dir``."""
    experiment: str = "fabric"
    model_name: str = "fabric-model"
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
