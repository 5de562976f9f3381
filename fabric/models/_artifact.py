"""The self-contained model artifact: ``model.pt`` (state_dict) + ``model.json`` (how to rebuild it).

Later stages (export, serving, registry) load it with :func:`load_model`, without Ray or DeepSpeed.
``model.json`` names a builder in :data:`BUILDERS` (other model families join by registering theirs) or
the user's own builder by import path (``package.module:function``); the user's module then travels in the
folder's ``code/`` (see ``fabric.models._user``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fabric.errors import FabricError
from fabric.models._signature import adapt, column_layout
from fabric.models._user import CODE_DIR, add_to_path, build_user_model, is_import_path
from fabric.models.tabular import build_mlp

WEIGHTS = "model.pt"
SPEC = "model.json"
FORMAT_VERSION = 1

# builder name in model.json -> function(**kwargs) -> nn.Module
BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp}


def model_spec(builder: str, kwargs: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """The content of ``model.json``: the builder (a name in :data:`BUILDERS` or an import path), its kwargs,
    and metadata (task, feature_names...)."""
    if builder not in BUILDERS and not is_import_path(builder):
        raise FabricError(f"unknown model builder {builder!r}; known: {', '.join(sorted(BUILDERS))}")
    return {"format_version": FORMAT_VERSION, "builder": builder, "kwargs": dict(kwargs), **meta}


def build_from_spec(spec: dict[str, Any], folder: str | Path | None = None) -> nn.Module:
    """Build the (untrained) module a ``model.json`` describes.

    Args:
        spec: the ``model.json`` content.
        folder: the model folder, whose ``code/`` (the user's module, when the builder is an import path) goes
            on ``sys.path`` first.

    Raises:
        FabricError: an unknown builder; ConfigError (a FabricError) when the user's builder cannot be
            imported or called.
    """
    name = str(spec.get("builder", ""))
    if is_import_path(name):
        if folder is not None:
            add_to_path(Path(folder) / CODE_DIR)
        field = f"{SPEC} builder"
        features, categorical = list(spec.get("feature_names") or []), list(spec.get("categorical") or [])
        net = build_user_model(name, spec["kwargs"], field, columns=column_layout(features, categorical))
        return adapt(net, features, categorical, field)
    builder = BUILDERS.get(name)
    if builder is None:
        raise FabricError(f"model.json names builder {spec.get('builder')!r}; known: {', '.join(sorted(BUILDERS))}")
    return builder(**spec["kwargs"])


def write_spec(path: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``model.json`` into folder ``path`` (created if missing)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return folder / SPEC


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read ``model.json`` from folder ``path``; FabricError when absent or unreadable."""
    file = Path(path) / SPEC
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FabricError(f"no {SPEC} in {path}: not a fabric model folder") from None
    except ValueError as e:
        raise FabricError(f"{file} is not valid JSON: {e}") from None


def save_model(path: str | Path, model: nn.Module, spec: dict[str, Any]) -> Path:
    """Write the artifact (``model.pt`` + ``model.json``) into folder ``path`` and return it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    write_spec(folder, spec)
    return folder


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load an artifact folder written by :func:`save_model` (or by the training stage).

    Args:
        path: the folder holding ``model.pt`` and ``model.json``.
        device: where to put the weights.

    Returns:
        The module in eval mode, and the ``model.json`` metadata (builder, kwargs, task, feature_names,
        num_classes...).
    """
    folder = Path(path)
    spec = read_spec(folder)
    if spec.get("framework", "torch") != "torch":  # xgboost / lightgbm: a booster behind a module's interface
        from fabric.models.trees import load_trees

        return load_trees(folder, spec, device)
    model = build_from_spec(spec, folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FabricError(f"no {WEIGHTS} in {folder}: the artifact is incomplete")
    state = torch.load(weights, map_location=device, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FabricError(f"{weights} does not match the architecture in {SPEC}: {e}") from None
    return model.to(device).eval(), spec
