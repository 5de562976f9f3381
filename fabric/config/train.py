"""Config of the training stage (Ray Train: DDP or DeepSpeed ZeRO)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO settings, used when ``train.strategy`` is ``deepspeed``."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (stage 2/3; needs CUDA)."""


class WorkerGroupConfig(Section):
    """How a Ray Train worker group trains: the fields ``train`` and ``llm.finetune`` share."""

    epochs: int = Field(default=5, ge=1)
    """Passes over the training split."""
    batch_size: int = Field(default=64, ge=1)
    """Examples per worker per step."""
    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (one process each)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """``auto`` uses GPUs when the cluster has them."""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """``ddp``: torch DDP (gloo on CPU, NCCL on GPU); ``deepspeed``: DeepSpeed ZeRO (``deepspeed`` below)."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """ZeRO stage and optimizer offload, used when ``strategy`` is ``deepspeed``."""
    max_failures: int = Field(default=2, ge=0)
    """Worker-group restarts allowed; each resumes from the last checkpoint."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' bundles: PACK fills a node first; SPREAD puts them on different nodes."""
    checkpoint_every: int = Field(default=1, ge=1)
    """Checkpoint every this many epochs (and after the last): a restart or a rerun resumes from the last one.
    Each checkpoint costs Ray Train a folder and a report; raise it for long runs of quick epochs."""
    keep_checkpoints: int | None = Field(default=2, ge=1)
    """How many of the latest checkpoints to keep (Ray Train's ``CheckpointConfig.num_to_keep``); None: all."""


IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
"""``package.module:function``: how a config names the user's code (Ray Serve's ``import_path`` style)."""

PARAM_GROUPS = ("model_args", "xgboost", "lightgbm")
"""Mapping-valued train fields whose entries a search may vary by a dotted key (``model_args.width``)."""


class TrainConfig(WorkerGroupConfig):
    """The model and how it is trained: fabric's MLP, the user's own module or loop, or gradient-boosted trees."""

    framework: Literal["torch", "xgboost", "lightgbm"] = "torch"
    """``torch``: a PyTorch module (``model``) trained by fabric's loop or the user's (``loop``) with DDP or
    DeepSpeed; ``xgboost`` / ``lightgbm``: Ray Train's XGBoostTrainer / LightGBMTrainer."""
    model: str = "mlp"
    """``mlp`` (fabric's MLP: hidden_size, num_layers, dropout) or ``package.module:function``, the user's
    builder, called as ``function(input_dim=…, output_dim=…, **model_args)`` and returning a ``torch.nn.Module``."""
    model_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of an own ``model`` builder (a search varies them as ``model_args.<name>``)."""
    loop: str | None = None
    """``package.module:function``: the user's ``train_loop_per_worker(config)``, run in fabric's TorchTrainer
    (strategy ddp) instead of fabric's loop (see ``fabric.train.session`` for its helpers)."""
    hidden_size: int = Field(default=64, ge=1)
    """Width of every hidden layer of the MLP."""
    num_layers: int = Field(default=2, ge=1)
    """Hidden layers of the MLP."""
    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout of the MLP after each hidden layer."""
    seed: int = 0
    xgboost: dict[str, Any] = Field(default_factory=dict)
    """XGBoost parameters (``xgboost.train``'s ``params``: max_depth, eta, subsample…); the objective and
    eval metric follow the task unless given. A search varies them as ``xgboost.<name>``."""
    lightgbm: dict[str, Any] = Field(default_factory=dict)
    """LightGBM parameters (``lightgbm.train``'s ``params``: num_leaves, learning_rate…); as ``xgboost``."""
    num_boost_round: int = Field(default=100, ge=1)
    """Boosting rounds of xgboost / lightgbm (their ``epochs``: a report per round)."""
    early_stopping_rounds: int | None = Field(default=10, ge=1)
    """Stop boosting when the validation metric has not improved for this many rounds; None: never."""

    @field_validator("model", "loop")
    @classmethod
    def _import_path(cls, v: str | None, info: Any) -> str | None:
        if v is None or (info.field_name == "model" and v == "mlp"):
            return v
        if not IMPORT_PATH.match(v):
            what = "'mlp' or " if info.field_name == "model" else ""
            raise ValueError(f"must be {what}'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _framework_fits(self) -> TrainConfig:
        if self.framework == "torch":
            if self.model == "mlp" and self.model_args:
                raise ValueError(
                    "model_args are the arguments of an own train.model ('package.module:function'); "
                    "fabric's mlp takes hidden_size, num_layers and dropout"
                )
            if self.loop is not None and self.strategy != "ddp":
                raise ValueError("an own train.loop runs with strategy ddp (DeepSpeed runs fabric's loop only)")
            return self
        clash = [
            f"{name}={value!r}"
            for name, value, default in (
                ("model", self.model, "mlp"),
                ("loop", self.loop, None),
                ("strategy", self.strategy, "ddp"),
            )
            if value != default
        ]
        if clash:
            raise ValueError(f"framework {self.framework} trains trees: {', '.join(clash)} apply to framework torch only")
        return self


def with_params(train: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``train`` (a ``TrainConfig`` dump or a loop config) with a search's ``params`` applied: a plain key
    replaces the field, a dotted key (``model_args.width``, ``xgboost.max_depth``) sets one entry of a
    mapping field; the input is not changed."""
    out = dict(train)
    for key, value in params.items():
        group, dot, name = key.partition(".")
        if dot:
            out[group] = {**(out.get(group) or {}), name: value}
        else:
            out[key] = value
    return out
