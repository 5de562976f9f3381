"""What every Ray Train worker runs to fine-tune a LoRA adapter: `lm_loop_per_worker`, DDP or DeepSpeed.

Checkpoints hold the adapter, never the base (which every worker loads from the run's ``llm/base``; from a URI
run_dir, through a copy on its own node)::

    adapter/          peft ``save_pretrained`` folder (the adapter's weights and config)
    train_state.pt    DDP: {"optimizer": state_dict, "epoch": int, "perplexity_before": float}
    deepspeed/        DeepSpeed: the engine's checkpoint without the frozen base weights, every rank's
                      ZeRO partition (epoch and perplexity_before in its client state)
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fabric import storage
from fabric.config import LoRAConfig
from fabric.models.causal_lm import load_causal_lm, lora_wrap
from fabric.train._checkpoint import DS_TAG, read_history, write_history
from fabric.train._loop import _maybe_crash, _say, deepspeed_config, import_deepspeed

ADAPTER = "adapter"
TRAIN_STATE = "train_state.pt"


def _adamw(model: torch.nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]  # the adapter only
    return torch.optim.AdamW(trainable, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))


class _DDP:
    """torch DDP over the peft model through `ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], rank: int) -> None:
        import ray.train.torch

        self.rank = rank
        self.module = model
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.wrapped = ray.train.torch.prepare_model(model)
        self.optimizer = _adamw(model, config)

    def train_step(self, ids: torch.Tensor) -> torch.Tensor:
        self.wrapped.train()
        loss = self.wrapped(input_ids=ids, labels=ids).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def eval_loss(self, ids: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(input_ids=ids, labels=ids).loss  # unwrapped: no collectives while evaluating

    def save(self, folder: Path, state: dict[str, Any]) -> bool:
        if self.rank != 0:  # replicas are identical: rank 0's copy is the checkpoint
            return False
        self.module.save_pretrained(str(folder / ADAPTER))
        torch.save({"optimizer": self.optimizer.state_dict(), **state}, folder / TRAIN_STATE)
        return True

    def load(self, folder: Path) -> dict[str, Any]:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(folder / ADAPTER / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.module, weights)
        state = torch.load(folder / TRAIN_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state


class _DeepSpeed:
    """A DeepSpeed ZeRO engine around the peft model; only the adapter's weights are optimised."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], rank: int) -> None:
        import ray.train.torch

        device = ray.train.torch.get_device()
        self.deepspeed = import_deepspeed(device)
        self.rank = rank
        self.stage = int(config["zero_stage"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        ds_config = deepspeed_config(config, ray.train.get_context().get_world_size())
        optimizer = None if "optimizer" in ds_config else _adamw(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = self.deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer is not None else trainable,
            config=ds_config,
        )
        self.device = self.engine.device

    def train_step(self, ids: torch.Tensor) -> torch.Tensor:
        self.engine.train()
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss

    def eval_loss(self, ids: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        return self.engine(input_ids=ids, labels=ids).loss  # through the engine: ZeRO-3 gathers weights

    def save(self, folder: Path, state: dict[str, Any]) -> bool:
        # Every rank writes its partition of the adapter's optimizer state; the frozen base stays out.
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state=state, exclude_frozen_parameters=True)
        module = self.engine.module
        adapter = [p for p in module.parameters() if p.requires_grad]
        # ZeRO-3 partitions the adapter too: gather it (a collective, so on every rank) for rank 0 to save.
        gathered = (
            self.deepspeed.zero.GatheredParameters(adapter, modifier_rank=None)
            if self.stage == 3
            else contextlib.nullcontext()
        )
        with gathered:
            if self.rank == 0:
                module.save_pretrained(str(folder / ADAPTER))
        return True

    def load(self, folder: Path) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint tagged {DS_TAG!r} in {folder}")
        return dict(client)


class _TokenSums:
    """Token-weighted loss over batches, summed across the worker group: perplexity is exp(mean loss)."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.tokens = 0

    def add(self, loss: torch.Tensor, ids: torch.Tensor) -> None:
        n = int(ids.shape[0] * (ids.shape[1] - 1))  # each position predicts the next token
        self.loss += float(loss.detach()) * n
        self.tokens += n

    def all_reduce(self) -> _TokenSums:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.loss, float(self.tokens)], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            self.loss, tokens = (float(v) for v in t.cpu())
            self.tokens = int(round(tokens))
        return self

    @property
    def mean(self) -> float:
        return self.loss / self.tokens if self.tokens else math.nan


def _batches(shard: Any, batch_size: int, device: torch.device, seed: int | None) -> Iterator[torch.Tensor]:
    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * batch_size if seed is not None else None,
        local_shuffle_seed=seed,
    ):
        # A copy: Ray hands out read-only arrays, which torch.as_tensor warns about.
        yield torch.tensor(batch["input_ids"], dtype=torch.long).to(device, non_blocking=True)


def _evaluate(strategy: _DDP | _DeepSpeed, shard: Any, config: dict[str, Any]) -> float:
    sums = _TokenSums()
    with torch.no_grad():
        for ids in _batches(shard, int(config["batch_size"]), strategy.device, None):
            sums.add(strategy.eval_loss(ids), ids)
    return sums.all_reduce().mean


def lm_epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """Rank 0's line after each epoch, e.g. ``epoch 2/3  train_loss 3.1020  val_loss 2.9911  val_perplexity 19.91``."""
    parts = [f"epoch {metrics['epoch']}/{epochs}"]
    parts += [f"{k} {metrics[k]:.4f}" for k in ("train_loss", "val_loss") if k in metrics]
    parts.append(f"val_perplexity {metrics['val_perplexity']:.2f} (before {metrics['perplexity_before']:.2f})")
    parts.append(f"({metrics['epoch_s']:.1f}s)")
    return "  ".join(parts)


def lm_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune a LoRA adapter on this worker's shard of the packed ``train`` dataset.

    Measures held-out perplexity (the ``val`` dataset) before the first epoch and after every epoch,
    reports metrics every epoch and an adapter checkpoint (with the history so far) every ``checkpoint_every``
    epochs and after the last, and resumes from ``ray.train.get_checkpoint()``
    after a worker failure (the epoch counter and the first perplexity carry over). Rank 0 prints one
    line per epoch.

    Args:
        config: keys base_dir (HF folder of the base model: a local path or a URI), lora (LoRAConfig fields), epochs,
            batch_size, lr, weight_decay, seed, strategy (ddp|deepspeed), zero_stage, offload_optimizer,
            checkpoint_every, fault_injection (tests only).
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    epochs, seed = int(config["epochs"]), int(config["seed"])
    torch.manual_seed(seed)  # the same adapter initialisation on every rank
    base = storage.localize(config["base_dir"])  # a bucket's: downloaded once per node and version
    model = lora_wrap(load_causal_lm(base), LoRAConfig.model_validate(config["lora"]))
    strategy: _DDP | _DeepSpeed = (_DeepSpeed if config["strategy"] == "deepspeed" else _DDP)(model, config, rank)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    start, before, history = 1, math.nan, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = strategy.load(Path(folder))
            history = read_history(Path(folder))
        start, before = int(state["epoch"]) + 1, float(state["perplexity_before"])
        if rank == 0:
            rest = f"; training epochs {start} to {epochs}" if start <= epochs else "; every epoch is done"
            _say(f"resumed from the adapter checkpoint of epoch {start - 1} of {epochs}{rest}")
    else:
        before = math.exp(_evaluate(strategy, val_shard, config))
        if rank == 0:
            _say(f"held-out perplexity before fine-tuning: {before:.2f}")

    for epoch in range(start, epochs + 1):
        _maybe_crash(config, epoch, rank)
        began = time.perf_counter()
        train = _TokenSums()
        for ids in _batches(train_shard, int(config["batch_size"]), strategy.device, seed * 100_003 + epoch):
            train.add(strategy.train_step(ids), ids)
        val_loss = _evaluate(strategy, val_shard, config)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train.all_reduce().mean,
            "train_tokens": train.tokens,
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "perplexity_before": before,
            "epoch_s": time.perf_counter() - began,
            "world_size": world_size,
            "resumed_from_epoch": start - 1,
        }
        history.append(metrics)
        if epoch % int(config.get("checkpoint_every", 1)) and epoch != epochs:  # metrics only this epoch
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory(prefix="fabric-lm-ckpt-") as tmp:
                wrote = strategy.save(Path(tmp), {"epoch": epoch, "perplexity_before": before})
                if wrote and rank == 0:
                    write_history(Path(tmp), history)
                checkpoint_out = ray.train.Checkpoint.from_directory(tmp) if wrote else None
                ray.train.report(metrics, checkpoint=checkpoint_out, checkpoint_dir_name=f"epoch_{epoch:04d}")
        if rank == 0:
            _say(lm_epoch_line(metrics, epochs))
