"""What every Ray Train worker runs: `train_loop_per_worker`, with a DDP or a DeepSpeed strategy."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fabric.config import with_params
from fabric.errors import require
from fabric.models import build_from_spec, check_loop, model_spec, write_spec
from fabric.models._user import add_to_path
from fabric.train._checkpoint import DS_TAG, load_ddp, read_history, save_ddp, write_history
from fabric.train._data import collate, iter_local, local_shard
from fabric.train._metrics import EpochSums, compute_loss, epoch_line

log = logging.getLogger(__name__)

# Hyperparameters the Tune stage varies per trial (through train_loop_config); the rest comes from
# `loop_config(cfg)`.
DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_layers": 2,
    "dropout": 0.1,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "epochs": 5,
    "seed": 0,
    "strategy": "ddp",
    "zero_stage": 2,
    "offload_optimizer": False,
    "checkpoint_every": 1,
    "model": "mlp",
    "model_args": {},
    "loop": None,
    "code_dirs": [],
}


def spec_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model.json spec (builder, kwargs, task metadata) a loop config describes: fabric's MLP, or the
    user's builder (``model``: an import path) with ``input_dim``, ``output_dim`` and ``model_args``."""
    classification = config["task"] == "classification"
    dims = {
        "input_dim": len(config["feature_names"]),
        "output_dim": int(config["num_classes"]) if classification else 1,
    }
    builder = str(config.get("model") or "mlp")
    if builder == "mlp":
        kwargs = {
            **dims,
            "hidden_size": int(config["hidden_size"]),
            "num_layers": int(config["num_layers"]),
            "dropout": float(config["dropout"]),
        }
    else:
        kwargs = {**dims, **_plain(config.get("model_args") or {})}
    return model_spec(
        builder,
        kwargs,
        task=config["task"],
        target=config.get("target"),
        feature_names=list(config["feature_names"]),
        categorical=list(config.get("categorical") or []),
        num_classes=int(config["num_classes"]) if classification else None,
    )


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` as JSON values (a search hands numpy scalars)."""
    return {k: v.item() if hasattr(v, "item") and callable(v.item) else v for k, v in args.items()}


def with_trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a search's dotted keys (``model_args.width``) applied to their mapping and removed."""
    dotted = {k: v for k, v in config.items() if "." in k}
    if not dotted:
        return config
    return with_params({k: v for k, v in config.items() if k not in dotted}, dotted)


def deepspeed_config(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a loop config (fp32; ZeRO stage and offload from the config)."""
    zero: dict[str, Any] = {"stage": int(config["zero_stage"])}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(config["batch_size"]),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(config["batch_size"]) * world_size,
        "zero_optimization": zero,
        # Our optimizer is a plain torch AdamW (DeepSpeed's fused one needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # the epoch line says enough
        "wall_clock_breakdown": False,
    }
    if config.get("offload_optimizer"):
        # Offloading needs DeepSpeed's own CPU Adam, so DeepSpeed builds the optimizer from this section.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": float(config["lr"]), "weight_decay": float(config["weight_decay"])},
        }
    return ds


def import_deepspeed(device: torch.device) -> Any:
    """DeepSpeed, without its shared-memory collective kernel on CPU: DeepSpeed compiles that C++ op (a minute of
    ``g++`` on a fresh machine, and a compiler every node must have) when its backend starts, for
    ``inference_all_reduce`` only, which training never calls; the process group (gloo) does every training
    collective. DeepSpeed reads that op's entry in its table of compatible ops (one module-level dict) before
    building it."""
    deepspeed = require("deepspeed", "deepspeed")
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _adamw(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    # float(): Tune may hand numpy scalars.
    return torch.optim.AdamW(model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))


class _DDP:
    """torch DDP through `ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: nn.Module, config: dict[str, Any], rank: int) -> None:
        self.rank = rank
        self.module = model
        if config.get("session") == "tune":  # one process, no worker group: plain torch
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.wrapped = model.to(self.device)
        else:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # NCCL collectives (the metric all-reduce) use the current device
            self.wrapped = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world_size > 1
        self.optimizer = _adamw(self.wrapped, config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.wrapped.train()
        out = self.wrapped(x)
        loss = compute_loss(task, out, y)  # type: ignore[arg-type]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out, loss

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)  # the unwrapped module: no collectives while evaluating

    def save(self, folder: Path, epoch: int, spec: dict[str, Any]) -> bool:
        if self.rank != 0:  # replicas are identical: rank 0's copy is the checkpoint
            return False
        save_ddp(folder, self.module, self.optimizer, epoch, spec)
        return True

    def load(self, folder: Path) -> int:
        return load_ddp(folder, self.module, self.optimizer)


class _DeepSpeed:
    """A DeepSpeed ZeRO engine on the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: nn.Module, config: dict[str, Any], rank: int) -> None:
        import ray.train.torch

        device = ray.train.torch.get_device()
        deepspeed = import_deepspeed(device)
        self.rank = rank
        if device.type == "cuda":
            torch.cuda.set_device(device)  # DeepSpeed places the engine on the current device
        ds_config = deepspeed_config(config, ray.train.get_context().get_world_size())
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = _adamw(model, config)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer is not None else model.parameters(),
            config=ds_config,
        )
        self.device = self.engine.device

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.train()
        out = self.engine(x)
        loss = compute_loss(task, out, y)  # type: ignore[arg-type]
        self.engine.backward(loss)
        self.engine.step()
        return out, loss

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        return self.engine(x)  # through the engine: ZeRO-3 gathers partitioned weights here

    def save(self, folder: Path, epoch: int, spec: dict[str, Any]) -> bool:
        # Every rank writes its ZeRO partition; Ray Train merges the ranks' folders into one checkpoint.
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"epoch": epoch})
        if self.rank == 0:
            write_spec(folder, spec)
        return True

    def load(self, folder: Path) -> int:
        path, client = self.engine.load_checkpoint(str(folder), tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint tagged {DS_TAG!r} in {folder}")
        return int(client["epoch"])


class _Batches:
    """This worker's batches of a split: its Ray Data shard, or (no datasets given) its rows of the parquet."""

    def __init__(self, config: dict[str, Any], rank: int, world_size: int, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.features = list(config["feature_names"])
        self.task = config["task"]
        self.batch_size = int(config["batch_size"])
        self.shards: dict[str, Any] = {}
        self.local: dict[str, Any] = {}
        for split in ("train", "val"):
            if config.get("ray_data_shards"):
                import ray.train

                self.shards[split] = ray.train.get_dataset_shard(split)
            else:
                self.local[split] = local_shard(config["data_dir"], split, self.features, rank, world_size)

    def __call__(self, split: str, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shuffle = split == "train"
        seed = int(self.config["seed"]) * 100_003 + epoch
        if split in self.shards:
            batches = self.shards[split].iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=max(8 * self.batch_size, 1024) if shuffle else None,
                local_shuffle_seed=seed if shuffle else None,
            )
            pairs: Iterator[tuple[torch.Tensor, torch.Tensor]] = (collate(b, self.features, self.task) for b in batches)
        else:
            pairs = iter_local(self.local[split], self.batch_size, self.features, self.task, seed if shuffle else None)
        for x, y in pairs:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _Session:
    """Where the loop reports: a Ray Train worker group, or one process of a Ray Tune trial.

    ``config["session"] == "tune"`` (set by the Tune stage's one-worker trials) runs the loop in the
    trial's own process, without a Ray Train run's start-up cost, reporting to Tune directly.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.tune = config.get("session") == "tune"
        if self.tune:
            if config["strategy"] != "ddp":
                raise ValueError("a one-process Tune trial runs the ddp strategy only")
            self.rank, self.world_size = 0, 1
        else:
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def get_checkpoint(self) -> Any:
        import ray.train
        import ray.tune

        return ray.tune.get_checkpoint() if self.tune else ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None, name: str) -> None:
        import ray.train
        import ray.tune

        if self.tune:
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder) if folder else None)
        else:
            checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if folder else None)


def _say(line: str) -> None:
    # Through fabric's logger, on the worker's stdout (which Ray forwards to the driver): Ray Train's print
    # patch would both log and echo a plain print, showing every line twice.
    log.info(line)


def _maybe_crash(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Fault injection for recovery tests: exit this worker process once, at a given epoch and rank.

    ``config["fault_injection"] = {"epoch": 2, "rank": 1, "marker": "/tmp/x"}``; the marker file makes
    it happen once across restarts.
    """
    spec = config.get("fault_injection")
    if not spec or epoch != spec["epoch"] or rank != spec.get("rank", 0):
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    import ray.train

    # Ray Train registers a checkpoint once it has collected every rank's report of it; a process that
    # dies right after `report` can take its report along, and the run then restarts from the one
    # before. Wait for the registration, so that this tests resuming from the last epoch's checkpoint.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    marker.write_text(f"worker rank {rank} exited at the start of epoch {epoch}\n")
    os._exit(1)  # like a killed process: no exception, no cleanup


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the model on this worker's shard, reporting metrics every epoch and a checkpoint every
    ``checkpoint_every`` epochs and after the last (with the history of every epoch so far).

    Used by the training stage's TorchTrainer and by every Ray Tune trial; with ``loop`` set it runs the
    user's ``train_loop_per_worker(config)`` instead (``fabric.train.session`` helps it). Resumes from
    ``ray.train.get_checkpoint()`` (after a worker failure, or a rerun of the same run), continuing the
    epoch counter. Rank 0 prints one line per epoch.

    Args:
        config: ``fabric.train.loop_config(cfg)`` plus any overrides (Tune's hyperparameters: lr,
            hidden_size, num_layers, dropout, batch_size, weight_decay, and dotted keys such as
            ``model_args.width``). Keys: model, model_args, loop, code_dirs, data_dir, task,
            feature_names, num_classes, target, epochs, seed, strategy (ddp|deepspeed), zero_stage,
            offload_optimizer, checkpoint_every, ray_data_shards (True when the trainer was given
            ``train``/``val`` datasets),
            fault_injection (tests only).
    """
    config = with_trial_params({**DEFAULTS, **config})
    add_to_path(*config["code_dirs"])  # the driver's folder of the user's module (a local cluster)
    if config.get("loop"):
        check_loop(str(config["loop"]))(config)
        return
    session = _Session(config)
    rank, world_size = session.rank, session.world_size
    task, epochs = config["task"], int(config["epochs"])
    torch.manual_seed(int(config["seed"]))  # the same initial weights on every rank
    spec = spec_from_config(config)
    model = build_from_spec(spec)
    strategy: _DDP | _DeepSpeed = (_DeepSpeed if config["strategy"] == "deepspeed" else _DDP)(model, config, rank)

    start, history = 1, []
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = strategy.load(Path(folder)) + 1
            history = read_history(Path(folder))
        if rank == 0:
            rest = f"; training epochs {start} to {epochs}" if start <= epochs else "; every epoch is done"
            _say(f"resumed from the checkpoint of epoch {start - 1} of {epochs}{rest}")
    every = int(config["checkpoint_every"])

    batches = _Batches(config, rank, world_size, strategy.device)
    for epoch in range(start, epochs + 1):
        _maybe_crash(config, epoch, rank)
        began = time.perf_counter()
        train = EpochSums(task)
        for x, y in batches("train", epoch):
            out, loss = strategy.train_step(x, y, task)
            train.add(out, y, loss)
        val = EpochSums(task)
        with torch.no_grad():
            for x, y in batches("val", epoch):
                out = strategy.eval_forward(x)
                val.add(out, y, compute_loss(task, out, y))
        metrics: dict[str, Any] = {
            "epoch": epoch,
            **train.all_reduce().metrics("train"),
            **val.all_reduce().metrics("val"),
            "train_rows": train.rows,
            "epoch_s": time.perf_counter() - began,
            "world_size": world_size,
            # The epoch this attempt started from (0: from scratch); it changes when a restart resumes.
            "resumed_from_epoch": start - 1,
        }
        history.append(metrics)
        if rank == 0:  # before the report: Tune stops a trial inside its last report, taking the line along
            _say(epoch_line(metrics, epochs))
        if epoch % every and epoch != epochs:  # no checkpoint this epoch: metrics only
            session.report(metrics, None, "")
        else:
            with tempfile.TemporaryDirectory(prefix="fabric-ckpt-") as tmp:
                wrote = strategy.save(Path(tmp), epoch, spec)
                if wrote and rank == 0:
                    write_history(Path(tmp), history)
                session.report(metrics, tmp if wrote else None, f"epoch_{epoch:04d}")
