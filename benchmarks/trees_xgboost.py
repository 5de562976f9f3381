# python benchmarks/trees_xgboost.py [--rows 200000] [--features 20] [--rounds 100] [--workers 2]
"""XGBoost: Ray Train (``fabric.train.run``, XGBoostTrainer on 2 workers) vs plain ``xgboost.train``, same run.

Both boost the same rounds with the same params (fabric's defaults for the task: ``multi:softprob``, ``hist``,
the same seed, no early stopping) on the same synthetic 3-class data, written as the ingestion stage writes
it, and evaluate train and val every round. The plain run reads the parquet splits itself and boosts in this
process with as many threads as Ray Train has workers (each worker boosts with one thread on its shard).

Columns: ``wall_s`` is the whole call (for fabric: Ray Data reading and sharding, the worker group's start, a
report to Ray Train every round, checkpoints, the model folder, the test-split summary; Ray itself is started
before the clock); ``boost_s`` the rounds alone (fabric: the sum of its per-round times); ``val_mlogloss`` and
``val_accuracy`` from each model on the val split. Ratios are against plain xgboost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def write_data(run_dir: Path, rows: int, features: int, seed: int = 0) -> Path:
    """Noisy 3-class data in the ingestion stage's layout (parquet splits + meta.json)."""
    rng = np.random.default_rng(seed)
    names = [f"f{i:02d}" for i in range(features)]
    weights = rng.normal(size=(features, 3))
    out = run_dir / "data"
    counts = {}
    for split, n in (("train", rows), ("val", rows // 5), ("test", rows // 5)):
        x = rng.normal(size=(n, features)).astype(np.float32)
        logits = x @ weights + np.sin(3 * x[:, :3]) @ weights[:3] + rng.normal(scale=1.0, size=(n, 3))
        frame = pd.DataFrame(x, columns=names)
        frame["label"] = logits.argmax(axis=1).astype(np.int64)
        (out / split).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / split / "part-00000.parquet", index=False)
        counts[split] = n
    meta = {"task": "classification", "target": "y", "feature_names": names, "num_classes": 3, "rows": counts}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def val_scores(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Multi-class log loss and accuracy from log-probabilities or probabilities (rows sum to one after exp)."""
    p = np.exp(outputs) if outputs.max() <= 0 else outputs
    p = np.clip(p / p.sum(axis=1, keepdims=True), 1e-15, 1.0)
    return {
        "val_mlogloss": float(-np.log(p[np.arange(len(labels)), labels]).mean()),
        "val_accuracy": float((p.argmax(axis=1) == labels).mean()),
    }


def plain_xgboost(data: Path, params: dict[str, Any], rounds: int, threads: int) -> dict[str, Any]:
    """The baseline: read the splits, build DMatrix, ``xgboost.train`` with train and val evaluated every round."""
    import xgboost

    start = time.perf_counter()
    names = json.loads((data / "meta.json").read_text())["feature_names"]
    train, val = (pd.read_parquet(data / s) for s in ("train", "val"))
    dtrain = xgboost.DMatrix(train[names].to_numpy(np.float32), label=train["label"].to_numpy())
    dval = xgboost.DMatrix(val[names].to_numpy(np.float32), label=val["label"].to_numpy())
    began = time.perf_counter()
    booster = xgboost.train(
        {**params, "nthread": threads}, dtrain, rounds, evals=[(dtrain, "train"), (dval, "val")], verbose_eval=False
    )
    boost_s = time.perf_counter() - began
    wall_s = time.perf_counter() - start
    scores = val_scores(booster.predict(dval), val["label"].to_numpy())
    return {"wall_s": wall_s, "boost_s": boost_s, **scores}


def fabric_xgboost(run_dir: Path, rounds: int, workers: int) -> dict[str, Any]:
    """fabric's training stage on Ray Train (Ray already up), then its model on the val split."""
    import torch

    from fabric.config import load_config
    from fabric.models import load_model
    from fabric.train import run

    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "name=bench",
            "train.framework=xgboost",
            f"train.num_workers={workers}",
            f"train.num_boost_round={rounds}",
            "train.early_stopping_rounds=null",
            f"train.checkpoint_every={rounds}",
        ],
    )
    start = time.perf_counter()
    result = run(cfg)
    wall_s = time.perf_counter() - start
    module, spec = load_model(result.model_path)
    val = pd.read_parquet(run_dir / "data" / "val")
    with torch.no_grad():
        out = module(torch.from_numpy(val[spec["feature_names"]].to_numpy(np.float32))).numpy()
    boost_s = sum(float(r.get("round_s", 0.0)) for r in result.history)
    return {"wall_s": wall_s, "boost_s": boost_s, "params": spec["params"], **val_scores(out, val["label"].to_numpy())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="training rows (val and test: a fifth each)")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    from fabric.train._trees import library_params

    with tempfile.TemporaryDirectory(prefix="fabric-bench-trees-") as tmp:
        run_dir = Path(tmp)
        data = write_data(run_dir, args.rows, args.features)
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
        try:
            ours = fabric_xgboost(run_dir, args.rounds, args.workers)
        finally:
            ray.shutdown()
        params = library_params("xgboost", "classification", 3, {}, seed=0, threads=args.workers)
        assert {k: v for k, v in ours.pop("params").items() if k != "nthread"} == {
            k: v for k, v in params.items() if k != "nthread"
        }, "fabric boosted with other params than the baseline"
        plain = plain_xgboost(data, params, args.rounds, args.workers)

    print(
        f"\nXGBoost, {args.rows} train rows x {args.features} features, 3 classes, {args.rounds} rounds "
        f"(train and val evaluated every round)"
    )
    header = f"{'':<34}{'wall_s':>9}{'boost_s':>9}{'val_mlogloss':>14}{'val_accuracy':>14}"
    print(header)
    print("-" * len(header))
    for name, r in (
        (f"plain xgboost.train ({args.workers} threads)", plain),
        (f"fabric Ray Train ({args.workers} workers)", ours),
    ):
        print(f"{name:<34}{r['wall_s']:>9.2f}{r['boost_s']:>9.2f}{r['val_mlogloss']:>14.4f}{r['val_accuracy']:>14.4f}")
    print(
        f"\nfabric / plain: wall {ours['wall_s'] / plain['wall_s']:.2f}x, "
        f"boosting {ours['boost_s'] / plain['boost_s']:.2f}x "
        f"(goal <= 1.3x); val_mlogloss difference {ours['val_mlogloss'] - plain['val_mlogloss']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
