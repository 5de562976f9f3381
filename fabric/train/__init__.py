"""Training stage: Ray Train TorchTrainer with DDP or DeepSpeed ZeRO, checkpoints every ``checkpoint_every``
epochs, one run per run key (settings + data digest); fabric's MLP or the user's own module
(``train.model``), fabric's loop or the user's (``train.loop``, helped by ``fabric.train.session``); LoRA
fine-tuning of causal language models (``finetune``) on the same machinery."""

from fabric.train._lm import FinetuneResult, finetune, llm_dir
from fabric.train._lm_loop import lm_loop_per_worker
from fabric.train._loop import train_loop_per_worker
from fabric.train import session
from fabric.train._trainer import TrainResult, build_trainer, check_code, loop_config, run

__all__ = [
    "FinetuneResult",
    "TrainResult",
    "build_trainer",
    "check_code",
    "finetune",
    "llm_dir",
    "lm_loop_per_worker",
    "loop_config",
    "run",
    "session",
    "train_loop_per_worker",
]
