"""Tiny stand-ins for what the data and training stages write, so tracking/export tests run on their own.

The data folder follows ingestion's layout (``<run_dir>/data``: ``train/`` and ``test/`` parquet with the
encoded float32 feature columns plus ``label``, ``meta.json``, ``preprocessor.json`` fitted with
``fabric.data.Preprocessor``, and ``reference.parquet`` holding raw rows). Model folders follow the
training stage's artifact (``model.pt`` state_dict + ``model.json`` naming builder ``mlp`` and its kwargs),
written with ``fabric.models`` when that package is present and in the same format without it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fabric.data import Preprocessor

HAVE_MODELS = importlib.util.find_spec("fabric.models") is not None
# Registered models in these tests load their module through this file, so they work with or without fabric.models.
MODEL_LOADER = "tests.unit.tracking.fixtures:load_model"
NUMERIC = [f"n{i}" for i in range(6)]
COLORS = ["blue", "green", "red"]
TARGET = "target"


def build_mlp(input_dim: int, output_dim: int, hidden_size: int, num_layers: int, dropout: float) -> torch.nn.Module:
    """fabric.models.build_mlp when it exists, else a network with the same layers."""
    if HAVE_MODELS:
        from fabric.models import build_mlp as real

        return real(input_dim, output_dim, hidden_size, num_layers, dropout)
    layers: list[torch.nn.Module] = []
    width = input_dim
    for _ in range(num_layers):
        layers += [torch.nn.Linear(width, hidden_size), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        width = hidden_size
    layers.append(torch.nn.Linear(width, output_dim))
    return torch.nn.Sequential(*layers)


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """fabric.models.load_model when it exists, else the same reading of the folder."""
    if HAVE_MODELS:
        from fabric.models import load_model as real

        return real(model_dir)  # type: ignore[no-any-return]
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    module = build_mlp(**meta["kwargs"])
    module.load_state_dict(torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True))
    return module.eval(), meta


@dataclass
class Dataset:
    """Synthetic data: encoded features per split, labels, the raw rows they came from, the preprocessor."""

    task: str
    preprocessor: Preprocessor
    x: dict[str, np.ndarray] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)
    raw: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return self.preprocessor.feature_names


def make_data(run_dir: str | Path, task: str = "classification", n: int = 600, seed: int = 0) -> Dataset:
    """Write ``<run_dir>/data`` like ingestion does and return the arrays."""
    rng = np.random.default_rng(seed)
    raw = pd.DataFrame(rng.normal(rng.uniform(-5, 5, len(NUMERIC)), rng.uniform(0.5, 3, len(NUMERIC)), (n, len(NUMERIC))),
                       columns=NUMERIC)  # fmt: skip
    raw["color"] = rng.choice(COLORS, n)
    cut = int(n * 0.7)
    train = raw.iloc[:cut]
    stats = {c: {"mean": train[c].mean(), "std": train[c].std(), "min": train[c].min(), "max": train[c].max()}
             for c in NUMERIC}  # fmt: skip
    pre = Preprocessor.fit(stats, {"color": COLORS}, [*NUMERIC, "color"])
    x = pre.transform(raw)
    logits = x @ rng.standard_normal(x.shape[1])
    if task == "classification":
        y: np.ndarray = (logits > np.median(logits)).astype(np.int64)
    else:
        y = (logits + 0.1 * rng.standard_normal(n)).astype(np.float32)
    data = Path(run_dir) / "data"
    ds = Dataset(task, pre)
    for split, sl in (("train", slice(0, cut)), ("test", slice(cut, n))):
        (data / split).mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(x[sl], columns=pre.feature_names)
        frame["label"] = y[sl]
        frame.to_parquet(data / split / "part-0.parquet", index=False)
        ds.x[split], ds.y[split], ds.raw[split] = x[sl], y[sl], raw.iloc[sl].reset_index(drop=True)
    pre.save(data / "preprocessor.json")
    ds.raw["train"].assign(**{TARGET: y[:cut]}).head(100).to_parquet(data / "reference.parquet", index=False)
    meta = {"task": task, "target": TARGET, "feature_names": pre.feature_names, "input_columns": [*NUMERIC, "color"],
            "num_classes": 2 if task == "classification" else None}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    return ds


def make_model(
    folder: str | Path,
    data: Dataset,
    *,
    steps: int = 0,
    seed: int = 0,
    hidden_size: int = 16,
    num_layers: int = 2,
) -> Path:
    """A model folder; ``steps`` full-batch Adam steps on ``data``'s train split (0: an untrained model)."""
    torch.manual_seed(seed)
    classification = data.task == "classification"
    kwargs = {"input_dim": len(data.feature_names), "output_dim": 2 if classification else 1,
              "hidden_size": hidden_size, "num_layers": num_layers, "dropout": 0.0}  # fmt: skip
    module = build_mlp(**kwargs)
    if steps:
        opt = torch.optim.Adam(module.parameters(), lr=0.02)
        xt, yt = torch.from_numpy(data.x["train"]), torch.from_numpy(data.y["train"])
        module.train()
        for _ in range(steps):
            opt.zero_grad()
            out = module(xt)
            loss = torch.nn.functional.cross_entropy(out, yt) if classification else torch.nn.functional.mse_loss(out[:, 0], yt)
            loss.backward()
            opt.step()
    meta = {"task": data.task, "target": TARGET, "feature_names": data.feature_names,
            "num_classes": 2 if classification else None}  # fmt: skip
    folder = Path(folder)
    if HAVE_MODELS:
        from fabric.models import model_spec, save_model

        return save_model(folder, module, model_spec("mlp", kwargs, **meta))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"format_version": 1, "builder": "mlp", "kwargs": kwargs, **meta}))
    return folder


@dataclass
class FakeTrainResult:
    """The training stage's result as the registry reads it."""

    model_path: Path
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    run_key: str = ""


def train_result(model_dir: Path, epochs: int = 3) -> FakeTrainResult:
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "val_accuracy": 0.5 + 0.1 * e}
        for e in range(epochs)
    ]
    return FakeTrainResult(model_dir, history, {"val_accuracy": history[-1]["val_accuracy"], "epochs": epochs})
