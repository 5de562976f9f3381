"""Training stage: Ray Train TorchTrainer with DDP or DeepSpeed ZeRO, checkpoints every epoch."""

from fabric.train._loop import train_loop_per_worker
from fabric.train._trainer import TrainResult, build_trainer, loop_config, run

__all__ = ["TrainResult", "build_trainer", "loop_config", "run", "train_loop_per_worker"]
