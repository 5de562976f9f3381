# python benchmarks/tune.py [--trials 12] [--epochs 8] [--concurrency 2]
"""Search: fabric's Tune stage (OptunaSearch TPE + ASHA, trials side by side) vs plain Optuna, same run.

Both search the same space (the default `tune.search_space`) with the same trial budget and epoch cap,
seeded TPE, on the same ingested data (`builtin:fair`), training the same MLP (`fabric.models.build_mlp`)
with AdamW. Plain Optuna runs its trials one after another in this process with no pruning, each for the
full epoch cap. Columns: best validation loss found, total trial-seconds (the sum of every trial's
training time), wall seconds, and epochs trained; ratios are fabric over plain Optuna.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _split(data: Path, name: str, features: list[str]) -> tuple[Any, Any]:
    import torch

    frame = pd.read_parquet(data / name)
    return torch.tensor(frame[features].to_numpy(np.float32)), torch.tensor(frame["label"].to_numpy(np.int64))


def plain_optuna(data: Path, trials: int, epochs: int, seed: int, batch_size: int) -> dict[str, float]:
    """Baseline: Optuna TPE (seeded), sequential trials, a plain torch loop per trial, no pruning."""
    import optuna
    import torch
    import torch.nn.functional as F

    from fabric.models import build_mlp

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    meta = json.loads((data / "meta.json").read_text())
    features = meta["feature_names"]
    xt, yt = _split(data, "train", features)
    xv, yv = _split(data, "val", features)
    trial_seconds = 0.0
    epochs_run = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal trial_seconds, epochs_run
        start = time.perf_counter()
        lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        hidden = trial.suggest_categorical("hidden_size", [32, 64, 128])
        dropout = trial.suggest_float("dropout", 0.0, 0.3)
        torch.manual_seed(seed)
        model = build_mlp(len(features), meta["num_classes"], hidden_size=hidden, num_layers=2, dropout=dropout)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        best = float("inf")
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed + epoch))
            for i in range(0, len(xt), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                best = min(best, float(F.cross_entropy(model(xv), yv)))
            epochs_run += 1
        trial_seconds += time.perf_counter() - start
        return best

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return {"best": study.best_value, "trial_s": trial_seconds, "wall_s": time.perf_counter() - start, "epochs": epochs_run}


def fabric_tune(cfg: Any) -> dict[str, float]:
    """fabric's Tune stage; trial-seconds and epochs read back from its trials."""
    from fabric.tune import run

    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    table = pd.read_csv(result.table_path)
    trial_s = 0.0
    for path in result.out_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            trial_s += float(lines[-1].get("time_total_s", 0.0))
    return {"best": float(table["best_val_loss"].min()), "trial_s": trial_s, "wall_s": wall, "epochs": int(table["epochs"].sum())}


def main() -> None:
    """Run both searches and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from fabric import data
    from fabric.config import load_config

    ray.init(num_cpus=max(2, args.concurrency), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="fabric-bench-tune-") as tmp:
        cfg = load_config(
            None,
            [
                f"run_dir={tmp}",
                "name=bench",
                f"tune.num_samples={args.trials}",
                f"tune.epochs_per_trial={args.epochs}",
                f"tune.max_concurrent_trials={args.concurrency}",
                f"tune.seed={args.seed}",
                "tune.scheduler.grace_period=1",
            ],
        )
        data.run(cfg)
        ours = fabric_tune(cfg)
        base = plain_optuna(Path(tmp) / "data", args.trials, args.epochs, args.seed, cfg.train.batch_size)
    ray.shutdown()
    print(f"\n{args.trials} trials, up to {args.epochs} epochs each, builtin:fair")
    print(f"{'search':38} {'best val_loss':>13} {'trial-s':>8} {'wall s':>7} {'epochs':>7}")
    for name, r in (("plain Optuna (sequential, no pruning)", base), ("fabric tune (TPE + ASHA)", ours)):
        print(f"{name:38} {r['best']:13.4f} {r['trial_s']:8.1f} {r['wall_s']:7.1f} {r['epochs']:7d}")
    print(
        f"{'ratio fabric / Optuna':38} {ours['best'] / base['best']:13.3f} {ours['trial_s'] / base['trial_s']:8.2f} "
        f"{ours['wall_s'] / base['wall_s']:7.2f} {ours['epochs'] / base['epochs']:7.2f}"
    )


if __name__ == "__main__":
    main()
