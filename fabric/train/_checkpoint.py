"""Checkpoint formats, and their conversion into the self-contained model artifact.

A DDP checkpoint folder::

    model.pt         state_dict of the unwrapped model
    model.json       how to rebuild it (fabric.models spec: builder, kwargs, task, feature_names...)
    train_state.pt   {"optimizer": state_dict (absent when an own loop reports none), "epoch": int}
    history.json     every epoch's metrics up to this checkpoint (the run's history, whatever was kept)

A DeepSpeed checkpoint folder is what ``engine.save_checkpoint(folder, tag="deepspeed")`` writes (every
rank its own ZeRO partition, merged into one folder by Ray Train) plus the same ``model.json`` and
``history.json``. Adapter checkpoints of fine-tuning carry ``history.json`` too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fabric.errors import FabricError, require
from fabric.models import build_from_spec, bundle_code, read_spec, save_model, write_spec
from fabric.models._artifact import SPEC
from fabric.models._user import is_import_path, resolve

WEIGHTS = "model.pt"
TRAIN_STATE = "train_state.pt"
DS_TAG = "deepspeed"
"""The tag (sub-folder) under which DeepSpeed engines save and load."""
HISTORY = "history.json"


def write_history(folder: Path, history: list[dict[str, Any]]) -> None:
    """Keep every epoch's metrics so far in a checkpoint: checkpoints are sparse and pruned, the history is not."""
    (folder / HISTORY).write_text(json.dumps(history))


def read_history(folder: Path) -> list[dict[str, Any]]:
    """The metrics of every epoch up to the checkpoint ``folder``; [] for a checkpoint without them."""
    path = folder / HISTORY
    return list(json.loads(path.read_text())) if path.is_file() else []


def save_ddp(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int, spec: dict[str, Any]
) -> None:
    """Write a DDP checkpoint of ``model`` (unwrapped) after ``epoch`` into ``folder`` (the optimizer's state
    too, when given)."""
    save_model(folder, model, spec)
    state: dict[str, Any] = {"epoch": epoch}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, folder / TRAIN_STATE)


def load_ddp(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a DDP checkpoint into ``model`` (unwrapped) and ``optimizer`` (when both the checkpoint and the
    call have one); returns the epoch it ended."""
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(folder / WEIGHTS, map_location=device, weights_only=True))
    state = torch.load(folder / TRAIN_STATE, map_location=device, weights_only=True)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def kind(folder: Path) -> str:
    """``"ddp"`` or ``"deepspeed"``: which format the checkpoint ``folder`` holds."""
    if (folder / WEIGHTS).is_file() and (folder / TRAIN_STATE).is_file():
        return "ddp"
    if (folder / DS_TAG).is_dir():
        return "deepspeed"
    raise FabricError(f"{folder} is neither a DDP nor a DeepSpeed checkpoint of fabric")


def to_artifact(checkpoint: Path, out: Path) -> Path:
    """Write the self-contained artifact (``model.pt`` + ``model.json``, and ``code/``: the user's module when
    the builder is an import path) of a checkpoint into ``out``.

    A DeepSpeed checkpoint is consolidated with DeepSpeed's ``zero_to_fp32`` (any ZeRO stage, on CPU),
    so loading the artifact needs neither DeepSpeed nor Ray.
    """
    spec = read_spec(checkpoint)
    if out.exists():
        shutil.rmtree(out)
    if kind(checkpoint) == "ddp":
        out.mkdir(parents=True)
        shutil.copy2(checkpoint / WEIGHTS, out / WEIGHTS)
        write_spec(out, spec)
    else:
        zero_to_fp32 = require("deepspeed.utils.zero_to_fp32", "deepspeed")
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
        model = build_from_spec(spec)
        model.load_state_dict(state)  # checks the consolidated weights against the architecture
        save_model(out, model, spec)
    builder = str(spec.get("builder", ""))
    if is_import_path(builder):
        # The user's module travels with the model: a replica or a registry load elsewhere rebuilds it from here.
        resolve(builder, f"{SPEC} builder")
        bundle_code(builder, out)
    return out
