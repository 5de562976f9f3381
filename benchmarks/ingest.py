"""Ingestion throughput: fabric's Ray Data stage vs a single-process pyarrow/pandas pipeline.

    python benchmarks/ingest.py [--rows 1000000] [--files 4] [--cpus N]

Both sides do the same work on the same generated parquet files (8 numeric and 2 categorical
features, a binary label): read, check not-null and a range, split train/val/test, fit
standardisation and one-hot encoding on train only, encode every split, write it as parquet, and keep
a 1,000-row raw reference sample plus training statistics. The baseline is what one would write
without fabric: pandas in one process, everything in memory (so it cannot stream data larger than
RAM, and uses one core). fabric's time is measured twice: cold (the first run starts Ray's worker
processes) and warm. Takes about a minute on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CATS = ["basic", "plus", "pro", "team", "enterprise"]


def generate(folder: Path, rows: int, files: int, seed: int = 0) -> int:
    """Write ``rows`` synthetic rows as ``files`` parquet files; returns their in-memory size in bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    nbytes = 0
    per = rows // files
    for i in range(files):
        n = per if i < files - 1 else rows - per * (files - 1)
        cols = {f"x{j}": rng.normal(j, 1 + j, n) for j in range(8)}
        cols["plan"] = rng.choice(CATS, n)
        cols["region"] = rng.choice(["eu", "us", "apac"], n)
        cols["label"] = (cols["x0"] + rng.normal(0, 1, n) > 0).astype(np.int64)
        table = pa.table(cols)
        nbytes += table.nbytes
        pq.write_table(table, folder / f"part-{i}.parquet")
    return nbytes


def baseline(src: Path, out: Path, seed: int = 42) -> None:
    """The single-process pipeline: pandas end to end."""
    out.mkdir(parents=True)
    df = pd.read_parquet(src)
    features = [c for c in df.columns if c != "label"]
    if df[features].isna().any().any():
        raise ValueError("nulls")
    if (df["x0"] < -100).any() or (df["x0"] > 100).any():
        raise ValueError("range")
    rng = np.random.default_rng(seed)
    u = rng.random(len(df))
    parts = {"train": df[u < 0.7], "val": df[(u >= 0.7) & (u < 0.85)], "test": df[u >= 0.85]}
    train = parts["train"]
    numeric = [c for c in features if df[c].dtype.kind == "f"]
    categorical = [c for c in features if c not in numeric]
    mean, std = train[numeric].mean(), train[numeric].std(ddof=0).replace(0, 1)
    cats = {c: sorted(train[c].unique()) for c in categorical}
    for name, part in parts.items():
        enc = ((part[numeric] - mean) / std).astype(np.float32)
        for c in categorical:
            enc = enc.join(pd.get_dummies(pd.Categorical(part[c], categories=cats[c]), prefix=c, prefix_sep="=",
                                          dtype=np.float32).set_index(part.index))  # fmt: skip
        enc["label"] = part["label"].to_numpy()
        enc.to_parquet(out / f"{name}.parquet")
    train.sample(n=min(1000, len(train)), random_state=seed).to_parquet(out / "reference.parquet")
    stats = {c: {"mean": float(mean[c]), "std": float(std[c])} for c in numeric}
    stats.update({c: train[c].value_counts(normalize=True).to_dict() for c in categorical})
    (out / "reference_stats.json").write_text(json.dumps(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    work = Path(tempfile.mkdtemp(prefix="fabric-bench-ingest-"))
    try:
        t = time.perf_counter()
        nbytes = generate(work / "src", args.rows, args.files)
        print(f"generated {args.rows:,} rows ({nbytes / 2**20:.0f} MiB in memory) in {time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        baseline(work / "src", work / "baseline")
        base_s = time.perf_counter() - t

        import ray

        from fabric.config import load_config
        from fabric.data import run

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        times = []
        for attempt in ("cold", "warm"):
            cfg = load_config(
                None,
                [
                    f"run_dir={work / attempt}",
                    f"data.source={work / 'src'}",
                    "data.target=label",
                    "data.expectations.not_null=[x0, x1, x2, x3, x4, x5, x6, x7, plan, region]",
                    "data.expectations.ranges.x0.min=-100",
                    "data.expectations.ranges.x0.max=100",
                ],
            )
            t = time.perf_counter()
            run(cfg)
            times.append(time.perf_counter() - t)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = args.rows
    lines = [
        f"{'pipeline':<44}{'seconds':>9}{'rows/s':>13}{'vs baseline':>13}",
        f"{'pandas, one process (baseline)':<44}{base_s:>9.1f}{rows / base_s:>13,.0f}{1.0:>12.2f}x",
        f"{f'fabric.data.run, Ray Data, {args.cpus} CPUs, cold':<44}{times[0]:>9.1f}{rows / times[0]:>13,.0f}"
        f"{base_s / times[0]:>12.2f}x",
        f"{f'fabric.data.run, Ray Data, {args.cpus} CPUs, warm':<44}{times[1]:>9.1f}{rows / times[1]:>13,.0f}"
        f"{base_s / times[1]:>12.2f}x",
    ]
    print("\n" + "\n".join(lines))
    print("(vs baseline > 1x: fabric is faster. fabric also streams: its memory stays bounded by blocks, not data.)")


if __name__ == "__main__":
    main()
