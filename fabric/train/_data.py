"""The training stage's input: the ingestion stage's data folder (parquet splits + meta.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fabric import storage
from fabric.errors import FabricError

if TYPE_CHECKING:
    import ray.data

SPLITS = ("train", "val", "test")


def data_dir(run_dir: str | Path) -> Path:
    """Where the ingestion stage writes its output for ``run_dir`` (local: a URI run_dir's is pulled first)."""
    return storage.pull(run_dir, "data", "meta.json")


def splits_location(run_dir: str | Path) -> str:
    """Where training workers read the ingested splits: a URI run_dir's ``data`` folder in the bucket (so no
    node needs a shared disk or the driver's local copy), else the local ``data`` folder."""
    return storage.join(run_dir, "data")


def read_meta(folder: Path) -> dict[str, Any]:
    """Read ``meta.json`` of the ingestion output; FabricError telling to run ingestion when absent."""
    meta_file = folder / "meta.json"
    missing = [str(folder / s) for s in ("train", "val") if not (folder / s).is_dir()]
    if not meta_file.is_file() or missing:
        what = meta_file if not meta_file.is_file() else ", ".join(missing)
        raise FabricError(
            f"no ingested data at {folder} ({what} is missing): run the ingestion stage first "
            "(python jobs/ingest.py --config ... or fabric run), with the same run_dir"
        )
    meta = json.loads(meta_file.read_text())
    problems = [k for k in ("task", "feature_names") if k not in meta]
    if meta.get("task") == "classification" and not meta.get("num_classes"):
        problems.append("num_classes")
    if problems:
        raise FabricError(f"{meta_file} lacks {', '.join(problems)}: re-run the ingestion stage")
    return meta


def read_split(folder: Path, name: str) -> ray.data.Dataset:
    """One split as a Ray Dataset, read the way the ingestion stage defines."""
    from fabric.data import read_split

    return read_split(folder, name)


def collate(batch: dict[str, np.ndarray], features: list[str], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A column batch → (features [rows, len(features)] float32, labels int64 or float32)."""
    x = torch.from_numpy(np.stack([np.asarray(batch[f], dtype=np.float32) for f in features], axis=1))
    # A copy: Ray hands out read-only arrays, which torch.from_numpy warns about.
    y = torch.tensor(np.asarray(batch["label"]), dtype=torch.int64 if task == "classification" else torch.float32)
    return x, y


def local_shard(
    folder: str | Path, name: str, features: list[str], rank: int, world_size: int
) -> dict[str, np.ndarray]:
    """This worker's equal share of one split (``folder``: a local path or a URI), read straight from parquet.

    Used when the trainer was given no Ray Datasets (a Ray Tune trial builds its own TorchTrainer):
    Ray Data tasks inside a trial would wait for CPUs the trial's workers hold. Every rank gets the
    same number of rows so DDP steps stay in lockstep.
    """
    import pyarrow.parquet as pq

    filesys, path = storage.filesystem(storage.join(folder, name))
    table = pq.read_table(path, filesystem=filesys, columns=[*features, "label"])
    per_rank = table.num_rows // world_size
    if per_rank == 0:
        raise FabricError(f"split {name!r} has {table.num_rows} rows, fewer than the {world_size} workers")
    part = table.slice(rank * per_rank, per_rank)
    return {c: part.column(c).to_numpy() for c in part.column_names}


def iter_local(
    columns: dict[str, np.ndarray], batch_size: int, features: list[str], task: str, seed: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a local shard, shuffled with ``seed`` (None: in order)."""
    rows = len(columns["label"])
    order = np.arange(rows) if seed is None else np.random.default_rng(seed).permutation(rows)
    for start in range(0, rows, batch_size):
        idx = order[start : start + batch_size]
        yield collate({k: v[idx] for k, v in columns.items()}, features, task)
