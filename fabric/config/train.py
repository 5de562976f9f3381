"""Config of the training stage (Ray Train: DDP or DeepSpeed ZeRO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class TrainConfig(WorkerGroupConfig):
    """The model and how it is trained."""

    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
