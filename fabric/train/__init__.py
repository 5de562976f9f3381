"""Training stage: Ray Train TorchTrainer with DDP or DeepSpeed ZeRO, checkpoints every ``checkpoint_every``
epochs, one run per run key (settings + data digest); LoRA fine-tuning of causal language models
(``finetune``) on the same machinery."""

from fabric.train._lm import FinetuneResult, finetune, llm_dir
from fabric.train._lm_loop import lm_loop_per_worker
from fabric.train._loop import train_loop_per_worker
from fabric.train._trainer import TrainResult, build_trainer, loop_config, run

__all__ = [
    "FinetuneResult",
    "TrainResult",
    "build_trainer",
    "finetune",
    "llm_dir",
    "lm_loop_per_worker",
    "loop_config",
    "run",
    "train_loop_per_worker",
]
