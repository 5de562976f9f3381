"""`fabric predict` vs a single-process pandas + ONNX Runtime loop: rows/s on the same file and model, and peak
memory with an input larger than the object store.

Run: python benchmarks/predict_tabular.py [--rows 1000000 --columns 16 --hidden-size 64 --small-store-mb 80]

Setup (not timed): a synthetic dataset (numeric columns and one categorical) is ingested, an MLP of its shape
is registered as the champion, and ``--rows`` rows of the same schema are written as one parquet file. Both
contenders read that file, apply the saved preprocessing, run the model's ONNX graph and write parquet:

* baseline: one process, pyarrow record batches -> ``Preprocessor.transform`` -> one ONNX Runtime session
  (its default threads) -> ``predictions_frame`` -> ``ParquetWriter``;
* fabric: ``fabric.predict.score`` (what ``fabric predict`` runs) on a local Ray started beforehand (its
  start is not timed; resolving the registered model is), with the input checks. A first run on a small file
  (not timed) warms the registry's download, the ONNX export and Ray's worker processes (their imports and
  the model's session), as on a running cluster.

The "cold" row is the first run on a freshly started Ray (its workers import Ray Data, fabric and ONNX
Runtime, and build the session, within the timed run). The last row repeats fabric's run on a fresh Ray whose
object store (``--small-store-mb``) is smaller than the input in memory: it must stream. Memory: the driver's
RSS growth during the run (this script's own setup and baseline hold memory of their own), and the object
store's peak use and what it spilled to disk (Ray's own accounting, sampled every 250 ms).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil


@dataclass
class _Registered:
    model_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""


def synthetic(rows: int, columns: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, columns)), columns=[f"x{i}" for i in range(columns)])
    df["city"] = rng.choice(["oslo", "paris", "lima", "pune"], size=rows)
    df["target"] = (df["x0"] + df["x1"] > 0).astype(np.int64)
    df.insert(0, "id", np.arange(rows, dtype=np.int64))
    return df


def setup(root: Path, args: argparse.Namespace) -> tuple[Any, Path, Path]:
    """Ingest a small sample, register an MLP of its shape as champion, write the big input; returns
    (config, model folder, input file)."""
    import torch

    from fabric import data, tracking
    from fabric.config import load_config
    from fabric.models import build_mlp, model_spec, save_model

    synthetic(5000, args.columns, 0).drop(columns=["id"]).to_parquet(root / "sample.parquet", index=False)
    cfg = load_config(
        None,
        [f"run_dir={root / 'run'}", f"data.source={root / 'sample.parquet'}", "track.model_name=bench",
         "predict.keep_columns=[id]", *([f"predict.batch_size={args.batch_size}"] if args.batch_size else [])],
    )  # fmt: skip
    ingested = data.run(cfg)
    torch.manual_seed(0)
    kwargs = {"input_dim": len(ingested.feature_names), "output_dim": 2, "hidden_size": args.hidden_size,
              "num_layers": 2, "dropout": 0.0}  # fmt: skip
    spec = model_spec("mlp", kwargs, task="classification", target="target",
                      feature_names=ingested.feature_names, num_classes=2)  # fmt: skip
    folder = save_model(root / "model", build_mlp(**kwargs).eval(), spec)
    tracking.run(cfg, _Registered(folder))
    big = root / "input.parquet"
    synthetic(args.rows, args.columns, 1).to_parquet(big, index=False, row_group_size=131_072)
    return cfg, folder, big


def baseline(cfg: Any, big: Path, out: Path) -> int:
    """The loop a user would write: record batches through the preprocessor and one ORT session."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fabric.data import load_preprocessor
    from fabric.export import onnx_for, session
    from fabric.tracking import predictions_frame, resolve_model

    folder = Path(resolve_model("models:/bench@champion", cfg))
    pre = load_preprocessor(folder / "preprocessor.json")
    sess = session(onnx_for(folder))
    name = sess.get_inputs()[0].name
    rows, writer = 0, None
    for batch in pq.ParquetFile(big).iter_batches(batch_size=65_536):
        df = batch.to_pandas()
        frame = predictions_frame(sess.run(None, {name: pre.transform(df)})[0], "classification")
        frame.insert(0, "id", df["id"].to_numpy())
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        rows += len(frame)
    if writer is not None:
        writer.close()
    return rows


class Peak:
    """Samples the driver's RSS above its level at the start (every 50 ms: what the run added, not what this
    script's own setup holds) and the object store's use and spilling (every 250 ms), in MiB."""

    def __init__(self) -> None:
        self.driver = self.store = self.spilled = 0
        self._base = psutil.Process().memory_info().rss >> 20
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _store(self) -> tuple[int, int]:
        import re

        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        used = re.search(r"Plasma memory usage (\d+) MiB", text)
        spilled = re.search(r"Spilled (\d+) MiB", text)
        return (int(used[1]) if used else 0), (int(spilled[1]) if spilled else 0)

    def _run(self) -> None:
        me, tick = psutil.Process(), 0
        while not self._stop.is_set():
            self.driver = max(self.driver, (me.memory_info().rss >> 20) - self._base)
            if tick % 5 == 0:
                used, spilled = self._store()
                self.store, self.spilled = max(self.store, used), max(self.spilled, spilled)
            tick += 1
            self._stop.wait(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_ray(store_mb: int | None) -> None:
    import ray

    from fabric.runtime import connect

    if ray.is_initialized():
        ray.shutdown()
    kwargs = {"object_store_memory": store_mb << 20} if store_mb else {}
    try:
        connect(None, num_cpus=psutil.cpu_count(), **kwargs)
    except Exception:  # a heavily loaded machine can time out starting the node: once more
        ray.shutdown()
        connect(None, num_cpus=psutil.cpu_count(), **kwargs)


def fabric_run(cfg: Any, big: Path, out: Path) -> tuple[int, float, Peak]:
    from fabric.predict import score

    shutil.rmtree(out, ignore_errors=True)
    with Peak() as peak:
        started = time.perf_counter()
        result = score(cfg, str(big), str(out))
        seconds = time.perf_counter() - started
    return result.rows, seconds, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--columns", type=int, default=16, help="numeric columns (plus one categorical)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--small-store-mb", type=int, default=80, help="object store of the last row (Ray's minimum: 75)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each contender (best kept)")
    p.add_argument("--batch-size", type=int, default=None, help="predict.batch_size (default: the config's)")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    root = Path(tempfile.mkdtemp(prefix="fabric-predict-bench-"))
    try:
        start_ray(None)
        cfg, _, big = setup(root, args)
        in_memory = pd.read_parquet(big).memory_usage(deep=True).sum()
        small = root / "small.parquet"
        pd.read_parquet(big).head(1000).to_parquet(small, index=False)
        fabric_run(cfg, small, root / "warm")  # the registry download, ONNX export and warm workers: once, here
        best: dict[str, tuple[float, int]] = {}
        loads: list[float] = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            n = baseline(cfg, big, root / "base.parquet")
            t = time.perf_counter() - t0
            best["base"] = min(best.get("base", (t, n)), (t, n))
            n, t, peak_default = fabric_run(cfg, big, root / "out")
            best["fabric"] = min(best.get("fabric", (t, n)), (t, n))
            loads.append(os.getloadavg()[0])
        base_rate = best["base"][1] / best["base"][0]
        size = f"input {big.stat().st_size / 2**20:.0f} MiB parquet, {in_memory / 2**20:.0f} MiB in pandas"
        print(f"\n{args.rows:,} rows, {args.columns} numeric + 1 categorical column, MLP {args.hidden_size} x2; {size}")
        head = f"{'rows':>9} {'s':>6} {'rows/s':>9} {'vs loop':>8} {'driver +RSS':>11} {'store peak':>10}"
        print(f"{'run':<42} {head} {'spilled':>8}", flush=True)

        def row(name: str, t: float, n: int, pk: Peak | None) -> None:
            mem = f"{pk.driver:>8} MiB {pk.store:>6} MiB {pk.spilled:>4} MiB" if pk else ""
            print(f"{name:<42} {n:>9,} {t:>6.1f} {n / t:>9,.0f} {n / t / base_rate:>7.2f}x {mem}", flush=True)

        row("pandas + ONNX Runtime loop (1 process)", *best["base"], None)
        row(f"fabric predict ({psutil.cpu_count()} CPUs)", *best["fabric"], peak_default)
        print(f"load average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}", flush=True)
        start_ray(None)
        n, t, peak = fabric_run(cfg, big, root / "out-cold")
        loads.append(os.getloadavg()[0])
        row("fabric predict, cold (fresh Ray)", t, n, peak)
        start_ray(args.small_store_mb)
        n, t, peak = fabric_run(cfg, big, root / "out-small")
        loads.append(os.getloadavg()[0])
        row(f"fabric predict, object store {args.small_store_mb} MiB", t, n, peak)
        print(f"load average (1 min) after the cold and small-store runs: {loads[-2]:.1f}, {loads[-1]:.1f}")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
