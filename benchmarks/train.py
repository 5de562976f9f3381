# python benchmarks/train.py [--rows 20000] [--features 16] [--epochs 5] [--batch-size 128]
"""Training: Ray Train (``fabric.train.run``, DDP) with 1 and 2 workers vs a plain torch loop, same run.

All three train the same MLP (``fabric.models.build_mlp``, same seed) with AdamW on the same synthetic
classification data, written as the ingestion stage writes it, with the same batch size and epochs.
The plain loop runs in this process on one thread, like one Ray Train worker (Ray gives each worker
one CPU and OMP_NUM_THREADS=1).

Columns: ``wall_s`` is the whole call (for Ray Train: worker-group start, Ray Data sharding, a checkpoint
every epoch, the artifact); ``epoch_s`` is the median epoch after the first (training plus validation);
``rows/s`` is training rows over ``epoch_s``; ratios are against the plain loop, and the last line
compares 2 workers with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def write_data(run_dir: Path, rows: int, features: int, seed: int = 0) -> Path:
    """Separable 3-class data in the ingestion stage's layout (parquet splits + meta.json)."""
    rng = np.random.default_rng(seed)
    names = [f"f{i:02d}" for i in range(features)]
    weights = rng.normal(size=(features, 3))
    out = run_dir / "data"
    counts = {}
    for split, n in (("train", rows), ("val", rows // 5), ("test", rows // 5)):
        x = rng.normal(size=(n, features)).astype(np.float32)
        frame = pd.DataFrame(x, columns=names)
        frame["label"] = (x @ weights).argmax(axis=1).astype(np.int64)
        (out / split).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / split / "part-00000.parquet", index=False)
        counts[split] = n
    meta = {"task": "classification", "target": "y", "feature_names": names, "num_classes": 3, "rows": counts}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def plain_torch(data: Path, hp: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """The baseline: one process, tensors in memory, a shuffled index per epoch."""
    import torch
    import torch.nn.functional as F

    from fabric.models import build_mlp

    start = time.perf_counter()
    torch.set_num_threads(1)
    meta = json.loads((data / "meta.json").read_text())
    names = meta["feature_names"]
    train, val = (pd.read_parquet(data / s) for s in ("train", "val"))
    x, y = torch.tensor(train[names].to_numpy()), torch.tensor(train["label"].to_numpy())
    vx, vy = torch.tensor(val[names].to_numpy()), torch.tensor(val["label"].to_numpy())
    torch.manual_seed(seed)
    model = build_mlp(len(names), meta["num_classes"], hp["hidden_size"], hp["num_layers"], hp["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    rng = np.random.default_rng(seed)
    epoch_s, acc = [], 0.0
    for _ in range(epochs):
        began = time.perf_counter()
        model.train()
        for idx in np.array_split(rng.permutation(len(y)), max(1, -(-len(y) // hp["batch_size"]))):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(vx).argmax(-1) == vy).float().mean())
        epoch_s.append(time.perf_counter() - began)
    return {"wall_s": time.perf_counter() - start, "epoch_s": epoch_s, "rows": len(y), "val_accuracy": acc}


def ray_train(run_dir: Path, hp: dict[str, Any], epochs: int, workers: int) -> dict[str, Any]:
    from fabric.config import PipelineConfig
    from fabric.train import run

    train = {**hp, "epochs": epochs, "num_workers": workers, "use_gpu": False, "max_failures": 0}
    cfg = PipelineConfig.model_validate({"name": f"bench-{workers}w", "run_dir": str(run_dir), "train": train})
    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "epoch_s": [h["epoch_s"] for h in result.history],
        "rows": result.history[-1]["train_rows"],
        "val_accuracy": result.metrics["val_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="training rows (val and test get a fifth each)")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")

    import ray

    hp = {
        "hidden_size": 64,
        "num_layers": 2,
        "dropout": 0.0,
        "lr": 3e-3,
        "weight_decay": 0.0,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="fabric-bench-train-") as tmp:
        run_dir = Path(tmp)
        data = write_data(run_dir, args.rows, args.features)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            results = {
                "plain torch loop": plain_torch(data, hp, args.epochs, seed=0),
                "Ray Train, 1 worker": ray_train(run_dir, hp, args.epochs, 1),
                "Ray Train, 2 workers": ray_train(run_dir, hp, args.epochs, 2),
            }
        finally:
            ray.shutdown()

    steady = {k: statistics.median(r["epoch_s"][1:]) for k, r in results.items()}
    base = results["plain torch loop"]
    print(
        f"\n{args.rows} training rows x {args.features} features, MLP 2x64, batch {args.batch_size}, "
        f"{args.epochs} epochs, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'setup':<22}{'wall_s':>8}{'epoch_s':>9}{'rows/s':>10}{'val_acc':>9}{'wall/torch':>12}{'epoch/torch':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<22}{r['wall_s']:>8.1f}{steady[name]:>9.3f}{r['rows'] / steady[name]:>10.0f}"
            f"{r['val_accuracy']:>9.3f}{r['wall_s'] / base['wall_s']:>12.1f}"
            f"{steady[name] / steady['plain torch loop']:>13.2f}"
        )
    one, two = "Ray Train, 1 worker", "Ray Train, 2 workers"
    print(
        f"\n2 workers vs 1: epoch speed-up {steady[one] / steady[two]:.2f}x, "
        f"wall ratio {results[two]['wall_s'] / results[one]['wall_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
