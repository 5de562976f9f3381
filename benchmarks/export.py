"""ONNX Runtime vs torch eager: latency (p50, p90) and throughput of the tabular MLP at batch 1 and 64.

Run: python benchmarks/export.py [--hidden-size 256 --num-layers 3 --input-dim 32 --seconds 2 --threads N]

Both engines run in this process on the same inputs with the same intra-op thread count; the model is
exported with fabric's own export path (``fabric.export.export_onnx``, dynamic batch) and, for the int8
row, quantized with ``fabric.export.quantize``. Ratios are torch's number over ONNX Runtime's (p50) and
ONNX Runtime's over torch's (throughput): above 1 means ONNX Runtime is faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fabric.export import export_onnx, quantize, session
from fabric.models import build_mlp


def timings(fn: Callable[[], object], seconds: float) -> list[float]:
    """Per-call seconds of ``fn`` called repeatedly for about ``seconds``."""
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def compare(engines: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Time every engine in interleaved rounds (so background load hits all alike): p50/p90 ms, rows/s."""
    for fn in engines.values():
        for _ in range(50):  # warm-up: allocations, thread pools, ORT's first-run graph work
            fn()
    calls: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            calls[name] += timings(fn, seconds / rounds)
    out = {}
    for name, times in calls.items():
        ms = np.asarray(times) * 1e3
        out[name] = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                     "rows_s": batch * len(times) / sum(times)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-dim", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.5, help="timed seconds per engine and batch size")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for both engines (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = p.parse_args(argv)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = build_mlp(args.input_dim, 2, args.hidden_size, args.num_layers, 0.1).eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(module, args.input_dim, Path(tmp) / "model.onnx")
        int8_path = quantize(fp32_path, Path(tmp) / "model.int8.onnx")
        sessions = {"onnxruntime": session(fp32_path, threads=threads), "onnxruntime int8": session(int8_path, threads=threads)}
        providers = sessions["onnxruntime"].get_providers()
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batches:
            x = rng.standard_normal((batch, args.input_dim), dtype=np.float32)
            xt = torch.from_numpy(x)

            def eager(xt: torch.Tensor = xt) -> object:
                with torch.inference_mode():
                    return module(xt)

            engines: dict[str, Callable[[], object]] = {"torch eager": eager}
            for name, sess in sessions.items():
                engines[name] = lambda sess=sess, feed={sess.get_inputs()[0].name: x}: sess.run(None, feed)
            res = compare(engines, batch, args.seconds)
            rows += [(name, batch, r, res["torch eager"] if name != "torch eager" else None) for name, r in res.items()]

    print(f"MLP {args.input_dim}->{args.hidden_size}x{args.num_layers}->2, {threads} intra-op thread(s), "
          f"torch {torch.__version__}, onnxruntime providers {providers}")  # fmt: skip
    header = f"{'engine':<18}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'rows/s':>13}{'p50 speedup':>13}{'rows/s ratio':>14}"
    print(header)
    print("-" * len(header))
    for name, batch, res, base in rows:
        speed = f"{base['p50'] / res['p50']:.2f}x" if base else "1.00x"
        ratio = f"{res['rows_s'] / base['rows_s']:.2f}x" if base else "1.00x"
        print(f"{name:<18}{batch:>6}{res['p50']:>10.4f}{res['p90']:>10.4f}{res['rows_s']:>13,.0f}{speed:>13}{ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
