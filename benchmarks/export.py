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


def measure(fn: Callable[[], object], batch: int, seconds: float, warmup: int = 50) -> dict[str, float]:
    """Call ``fn`` repeatedly for about ``seconds``: per-call p50/p90 in ms and rows per second."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    arr = np.asarray(times) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)), "rows_s": batch * len(times) / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-dim", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per engine and batch size")
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
        engines = {"onnxruntime": session(fp32_path, threads=threads), "onnxruntime int8": session(int8_path, threads=threads)}
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batches:
            x = rng.standard_normal((batch, args.input_dim), dtype=np.float32)
            xt = torch.from_numpy(x)

            def eager(xt: torch.Tensor = xt) -> object:
                with torch.inference_mode():
                    return module(xt)

            base = measure(eager, batch, args.seconds)
            rows.append(("torch eager", batch, base, None))
            for name, sess in engines.items():
                feed = {sess.get_inputs()[0].name: x}
                res = measure(lambda sess=sess, feed=feed: sess.run(None, feed), batch, args.seconds)
                rows.append((name, batch, res, base))

    print(f"MLP {args.input_dim}->{args.hidden_size}x{args.num_layers}->2, {threads} intra-op thread(s), "
          f"torch {torch.__version__}, providers {engines['onnxruntime'].get_providers()}")  # fmt: skip
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
