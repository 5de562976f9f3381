"""Helpers for the user's own training loop (``train.loop: "my_models.loop:train_func"``).

fabric runs ``train_func(config)`` on every worker of its TorchTrainer (scaling, restarts, checkpoint and
storage config as for fabric's loop) and in each single-process Tune trial. ``config`` holds the loop config
(``task``, ``feature_names``, ``num_classes``, ``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``seed``,
``model``, ``model_args``, ...; a search's values already applied). :func:`start` gives the worker's
:class:`Session`::

    from fabric.train import session

    def train_func(config):
        s = session.start(config)
        model = s.prepare(s.build_model())          # train.model / model_args; DDP when there are workers
        opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
        for epoch in range(s.resume(model, opt) + 1, config["epochs"] + 1):
            for x, y in s.batches("train", epoch):
                loss = s.loss(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
            s.report({"epoch": epoch, **s.evaluate(model, "val")}, model=model, optimizer=opt)

A report with ``model`` checkpoints in fabric's format (``model.pt`` + ``model.json`` + the history), so the
run's model is registered, exported, served and monitored like fabric's own. Every worker must call
``report`` the same number of times (rank 0 writes the checkpoint).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fabric.errors import FabricError
from fabric.models import build_from_spec
from fabric.train._checkpoint import load_ddp, read_history, save_ddp, write_history
from fabric.train._loop import DEFAULTS, _Batches, _Session, spec_from_config, with_trial_params
from fabric.train._metrics import EpochSums, compute_loss

log = logging.getLogger(__name__)

__all__ = ["Session", "start"]


def start(config: dict[str, Any]) -> Session:
    """The session of this worker (or Tune trial) for the loop config fabric passed to the user's loop."""
    return Session(config)


class Session:
    """This worker's view of the run: rank, device, data shard, model, metrics and checkpoints.

    Attributes:
        config: the loop config (defaults filled in, a search's values applied).
        rank: this worker's rank (0 in a single-process Tune trial).
        world_size: the number of workers.
        device: where batches go (``cuda`` on a GPU worker, else ``cpu``).
        history: every reported epoch's metrics so far (after :meth:`resume`, the earlier ones too).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = with_trial_params({**DEFAULTS, **config})
        if self.config["strategy"] != "ddp":
            raise FabricError("an own train.loop runs with strategy ddp (fabric's DeepSpeed path is its own loop)")
        self._session = _Session(self.config)
        self.rank, self.world_size = self._session.rank, self._session.world_size
        self.tune = self._session.tune
        if self.tune:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        self.task: str = self.config["task"]
        self.spec = spec_from_config(self.config)
        self.history: list[dict[str, Any]] = []
        self._batches: _Batches | None = None
        self._checked = False

    def build_model(self) -> nn.Module:
        """The configured model (``train.model`` with ``model_args``, or fabric's MLP), with the same seeded
        initial weights on every rank. Report this architecture: its ``model.json`` is written from the config."""
        torch.manual_seed(int(self.config["seed"]))
        return build_from_spec(self.spec)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this worker's device, wrapped in DDP when there are several workers
        (``ray.train.torch.prepare_model``); as it is, moved to the device, in a Tune trial."""
        if self.tune:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def batches(self, split: str = "train", epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's shard of ``split`` (``train`` or ``val``) as ``(features, labels)`` batches of
        ``batch_size`` on :attr:`device`: float32 ``[rows, len(feature_names)]`` features; int64 class labels
        or float32 values. ``train`` is shuffled, differently each ``epoch``."""
        if split not in ("train", "val"):
            raise FabricError(f"split must be 'train' or 'val', got {split!r}")
        if self._batches is None:
            self._batches = _Batches(self.config, self.rank, self.world_size, self.device)
        return self._batches(split, epoch)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """fabric's loss for the task: cross-entropy on logits, or MSE on the one output."""
        return compute_loss(self.task, output, labels)  # type: ignore[arg-type]

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """``{split}_loss`` and ``{split}_accuracy`` or ``{split}_rmse`` of ``model`` over the whole split
        (every worker's shard, summed across workers: call it on every rank)."""
        inner = _unwrap(model)
        was_training = inner.training
        inner.eval()
        sums = EpochSums(self.task)  # type: ignore[arg-type]
        with torch.no_grad():
            for x, y in self.batches(split):
                out = inner(x)  # the unwrapped module: no collectives while evaluating
                sums.add(out, y, self.loss(out, y))
        inner.train(was_training)
        return sums.all_reduce().metrics(split)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Load the run's last checkpoint (after a worker failure, or a rerun of an interrupted run) into
        ``model`` and ``optimizer``, and its history into :attr:`history`.

        Returns:
            The epoch that checkpoint ended (train from the next one); 0 when there is none.
        """
        checkpoint = self._session.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as folder:
            epoch = load_ddp(Path(folder), _unwrap(model), optimizer)
            self.history = read_history(Path(folder))
        self.say(f"resumed from the checkpoint of epoch {epoch}")
        return epoch

    def report(
        self, metrics: dict[str, Any], model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Report one epoch's ``metrics`` (``epoch`` is added when missing: the next after the last) to Ray
        Train or Tune; with ``model``, a checkpoint in fabric's format too (rank 0's copy of the weights and,
        when given, the optimizer's state), carrying the history so far. The run's model is its last checkpoint.

        Raises:
            FabricError: ``model`` is not the architecture :meth:`build_model` builds.
        """
        last = int(self.history[-1]["epoch"]) if self.history else 0
        metrics = {"epoch": last + 1, **metrics, "world_size": self.world_size}
        self.history.append(metrics)
        if model is None:
            self._session.report(metrics, None, "")
            return
        module = _unwrap(model)
        if not self._checked:
            self._check(module)
        epoch = int(metrics["epoch"])
        with tempfile.TemporaryDirectory(prefix="fabric-ckpt-") as tmp:
            wrote = self.rank == 0
            if wrote:
                save_ddp(Path(tmp), module, optimizer, epoch, self.spec)
                write_history(Path(tmp), self.history)
            self._session.report(metrics, tmp if wrote else None, f"epoch_{epoch:04d}")

    def say(self, line: str) -> None:
        """Say ``line`` once (on rank 0) through fabric's logger: the worker's stdout, which Ray forwards to the driver."""
        if self.rank == 0:
            log.info(line)

    def _check(self, module: nn.Module) -> None:
        expected = {k: tuple(v.shape) for k, v in build_from_spec(self.spec).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if got != expected:
            raise FabricError(
                f"the reported model is not the one model.json rebuilds ({self.spec['builder']} with "
                f"{self.spec['kwargs']}): build it with session.build_model() (train.model / train.model_args)"
            )
        self._checked = True


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
