# python benchmarks/drift.py [--windows 100 500 2000] [--columns 10 30 100] [--repeats 3]
"""Drift computation time: fabric's DriftMonitor.compute() vs a plain scipy per-column KS loop, same run.

Numeric columns only, so both sides run the same test (Evidently picks K-S for references up to 1000 rows);
the reference sample has ``data.reference_sample_size`` rows (1000) and the window defaults include
``monitor.window_size`` (500); 30 columns is the shipped default dataset (breast_cancer). fabric's time
includes building the frame from the window's row dicts, aligning types and Evidently's per-column tests.
For the default window it also times Evidently's ``Report([DataDriftPreset()])`` (what the HTML report runs),
which the JSON path avoids.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd


def _time(fn: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _frames(window: int, columns: int, ref_rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    names = [f"f{i:03d}" for i in range(columns)]
    ref = pd.DataFrame(rng.normal(size=(ref_rows, columns)), columns=names)
    ref["target"] = rng.integers(0, 2, ref_rows)
    cur = pd.DataFrame(rng.normal(size=(window, columns)), columns=names)
    cur.iloc[:, : columns // 3] += 0.5  # a third of the columns drift
    cur["target"] = rng.integers(0, 2, window)
    return ref, cur


def scipy_ks_loop(ref: pd.DataFrame, cur: pd.DataFrame, columns: list[str], alpha: float = 0.05) -> dict[str, bool]:
    """The baseline: scipy's two-sample KS on every column, nothing else."""
    from scipy.stats import ks_2samp

    return {c: bool(ks_2samp(ref[c].to_numpy(), cur[c].to_numpy()).pvalue < alpha) for c in columns}


def main(argv: list[str] | None = None) -> int:
    from fabric.config import MonitorConfig, PipelineConfig
    from fabric.monitor import DriftMonitor, stats

    defaults = PipelineConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[100, defaults.monitor.window_size, 2000])
    parser.add_argument("--columns", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--reference-rows", type=int, default=defaults.data.reference_sample_size)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("fabric.monitor").setLevel(logging.ERROR)  # no "drift detected" lines in the table

    stats.evidently()  # a one-off import (seconds), not part of any timing
    header = f"{'window':>7} {'columns':>7} {'fabric s':>9} {'scipy KS s':>10} {'ratio':>6} {'Evidently Report s':>18}"
    header += "  agree"
    print(f"reference rows: {args.reference_rows}; median of {args.repeats}; ratio = fabric / scipy KS loop")
    print(header)
    print("-" * len(header))
    for window in args.windows:
        for columns in args.columns:
            ref, cur = _frames(window, columns, args.reference_rows)
            names = [c for c in ref.columns if c != "target"]
            cfg = MonitorConfig(window_size=max(window, 10), min_samples=1, interval_s=3600)
            mon = DriftMonitor(cfg, ref, target="target", task="classification")
            mon.add(cur[names].to_dict("records"), cur["target"].tolist())
            fabric_s = _time(mon.compute, args.repeats)
            base_s = _time(lambda r=ref, c=cur, n=names: scipy_ks_loop(r, c, n), args.repeats)
            ours = set(mon.compute()["drifted_columns"])
            theirs = {c for c, d in scipy_ks_loop(ref, cur, names).items() if d}
            report = "-"
            if window == defaults.monitor.window_size:
                kinds = dict.fromkeys(names, "num")
                result = mon.compute()  # the report renders this result (fabric's summary, then Evidently's)
                report_s = _time(lambda r=ref, c=cur, x=result, k=kinds: stats.report_html(r, c, x, k), 1)
                report = f"{report_s:.3f}"
            print(
                f"{window:>7} {columns:>7} {fabric_s:>9.4f} {base_s:>10.4f} {fabric_s / base_s:>6.1f} {report:>18}  "
                f"{'yes' if ours == theirs else 'NO'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
