"""A tiny ingestion-stage output (parquet splits + meta.json) for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def write_synthetic(
    run_dir: str | Path,
    task: str = "classification",
    rows: tuple[int, int, int] = (256, 64, 64),
    features: int = 4,
    seed: int = 0,
) -> Path:
    """Write ``<run_dir>/data`` as fabric.data would: linearly separable classes (or a noisy linear
    target), one float32 column per feature plus ``label``; returns the data folder."""
    rng = np.random.default_rng(seed)
    out = Path(run_dir) / "data"
    names = [f"x{i}" for i in range(features)]
    weights = rng.normal(size=features)
    counts = {}
    for split, n in zip(("train", "val", "test"), rows, strict=True):
        x = rng.normal(size=(n, features)).astype(np.float32)
        score = x @ weights
        frame = pd.DataFrame(x, columns=names)
        if task == "classification":
            frame["label"] = (score > 0).astype(np.int64)
        else:
            frame["label"] = (score + 0.1 * rng.normal(size=n)).astype(np.float32)
        (out / split).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / split / "part-00000.parquet", index=False)
        counts[split] = n
    meta = {
        "task": task,
        "target": "y",
        "feature_names": names,
        "num_classes": 2 if task == "classification" else None,
        "rows": counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out
