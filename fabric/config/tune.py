"""Config of the search stage (Ray Tune + Optuna + ASHA)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section

from fabric.config.train import PARAM_GROUPS

# train.* fields a search may vary (the rest shape the run, not the model); besides these, entries of the
# mapping fields in PARAM_GROUPS by a dotted key (model_args.width, xgboost.max_depth).
TREE_GROUPS = ("xgboost", "lightgbm")
TUNABLE = ("lr", "hidden_size", "num_layers", "dropout", "batch_size", "weight_decay", "num_boost_round")


class Param(Section):
    """One search dimension: ``loguniform``/``uniform``/``int`` need low < high, ``choice`` needs values."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Param:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class Scheduler(Section):
    """ASHA early stopping: trials are cut at rungs grace_period * reduction_factor^k (epochs; for trees boosting
    rounds, the first rung at least a tenth of the rounds)."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)


def _default_space() -> dict[str, Param]:
    return {
        "lr": Param(type="loguniform", low=1e-4, high=3e-2),
        "hidden_size": Param(type="choice", values=[32, 64, 128]),
        "dropout": Param(type="uniform", low=0.0, high=0.3),
    }


class TuneConfig(Section):
    """Hyperparameter search around the training loop."""

    enabled: bool = True
    num_samples: int = Field(default=8, ge=1)
    """Total number of trials."""
    max_concurrent_trials: int = Field(default=2, ge=1)
    epochs_per_trial: int = Field(default=6, ge=1)
    """Maximum epochs a trial may run (ASHA's max_t). Tree trials boost ``train.num_boost_round`` rounds (or the
    searched ``num_boost_round``) instead, one report per round."""
    workers_per_trial: int = Field(default=1, ge=1)
    """Ray Train workers of each trial (DDP inside a trial); trials run side by side up to max_concurrent_trials.
    A tree trial is one process boosting with this many threads."""
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    seed: int = 0
    search_space: dict[str, Param] = Field(default_factory=_default_space)
    """Keys are train.* fields (lr, hidden_size, dropout, batch_size, weight_decay, num_boost_round) or entries
    of train's mappings by a dotted key (``model_args.width``, ``xgboost.max_depth``, ``lightgbm.num_leaves``).
    A tree search (``train.framework`` xgboost or lightgbm) left with this default MLP space searches a
    default tree space instead (``fabric.tune.TREE_SPACES``)."""
    scheduler: Scheduler = Field(default_factory=Scheduler)

    @field_validator("search_space")
    @classmethod
    def _names_train_fields(cls, v: dict[str, Param]) -> dict[str, Param]:
        unknown = sorted(k for k in v if k not in TUNABLE and k.partition(".")[0] not in PARAM_GROUPS)
        if unknown:
            raise ValueError(
                f"keys must be train fields among {', '.join(TUNABLE)} or '<group>.<name>' with group among "
                f"{', '.join(PARAM_GROUPS)}; got {', '.join(unknown)}"
            )
        return v

    @model_validator(mode="after")
    def _grace_within_budget(self) -> TuneConfig:
        # A tree search's rungs count boosting rounds (up to train.num_boost_round), not epochs.
        trees = any(k == "num_boost_round" or k.partition(".")[0] in TREE_GROUPS for k in self.search_space)
        if self.scheduler.type == "asha" and not trees and self.scheduler.grace_period > self.epochs_per_trial:
            raise ValueError(
                f"scheduler.grace_period ({self.scheduler.grace_period}) must be <= epochs_per_trial ({self.epochs_per_trial})"
            )
        return self
