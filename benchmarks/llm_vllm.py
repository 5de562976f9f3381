"""vLLM behind fabric: fabric's OpenAI endpoint on vLLM vs vLLM's own server, fabric's transformers engine vs
fabric on vLLM, and ``fabric generate`` vs one ``LLM.generate`` call — same model folder, same load, one run.

    python benchmarks/llm_vllm.py [--concurrency 1 16] [--max-tokens 64] [--layers 6] [--width 512] [--repeats 3]
        [--prompts 256] [--no-transformers] [--no-generate]

The model is the same freshly initialised GPT-2 as ``benchmarks/llm_serve.py`` (nothing downloaded; the
end-of-sequence logit zeroed, so every request generates exactly ``--max-tokens`` tokens), fp32, greedy.

* ``vllm serve``: ``python -m vllm.entrypoints.openai.api_server`` on the folder, with the very arguments fabric's
  replica gives vLLM (:func:`fabric.serve.llm.vllm_engine.vllm_argv`): the anchor;
* ``fabric (vLLM)``: ``fabric.serve.llm.deploy`` on a local Ray, Serve's HAProxy fast path (fabric's default);
* ``fabric (transformers)``: the same app with ``llm.serve.engine=transformers``.

Each level is a burst of 16 streamed completions from N concurrent clients (closed loop); the two vLLM sides run
paired bursts (vLLM's server, then fabric's, ``--repeats`` times) and the table shows medians of the per-pair
ratios. Output tokens/s is completion tokens over the burst's wall time; TTFT the median time to the first token.
The goals: fabric keeps >= 0.9x of ``vllm serve``'s tokens/s and adds <= 10% to its TTFT.

Batch generation: ``--prompts`` prompts through ``fabric.predict.generate`` (Ray Data + ``ray.data.llm``, one engine,
wall time including the engine's start) vs one ``vllm.LLM(...).generate`` call over the same prompts (engine start
timed apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model and load of llm_serve.py

from llm_serve import BURST, _stream, build_model, prompts  # noqa: E402

from fabric.runtime import free_port  # noqa: E402

KV_GB = 1.0


async def burst(url: str, texts: list[str], concurrency: int, max_tokens: int) -> tuple[float, float, int]:
    """(output tokens/s, TTFT p50 seconds, completion tokens) of a burst of ``texts`` over ``concurrency`` clients."""
    import httpx

    per_client = [texts[i::concurrency] for i in range(concurrency)]
    ttfts: list[float] = []
    total = 0

    async def loop(client: Any, mine: list[str]) -> None:
        nonlocal total
        for p in mine:
            ttft, _, n = await _stream(client, url, p, max_tokens)
            ttfts.append(ttft)
            total += n

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        await _stream(client, url, texts[0], 4)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(loop(client, mine) for mine in per_client))
        wall = time.perf_counter() - start
    return total / wall, statistics.median(ttfts), total


def start_vllm_server(cfg: Any, port: int, log: Path) -> subprocess.Popen:
    """vLLM's own OpenAI server on ``cfg``'s folder with fabric's arguments; returns once it answers."""
    import httpx

    from fabric.serve.llm.vllm_engine import vllm_argv

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_argv(cfg.llm.serve, "bench")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve did not answer in 600 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def generation(cfg: Any, folder: Path, root: Path, n: int, max_tokens: int) -> dict[str, float]:
    """Batch generation: fabric generate (Ray Data, one engine) vs one LLM.generate call over the same prompts."""
    import pandas as pd

    from fabric.predict import generate

    texts = prompts(n, seed=3)
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    g = cfg.model_copy(deep=True)
    g.llm.generate.input = str(src)
    g.llm.generate.output = str(root / "generated.parquet")
    g.llm.generate.max_tokens = max_tokens
    g.llm.generate.batch_size = 64
    start = time.perf_counter()
    result = generate(g, folder)
    fabric_s = time.perf_counter() - start
    assert len(pd.read_parquet(result.output)) == n
    # the baseline in a fresh process (its engine takes the CPUs fabric's has given back)
    script = root / "llm_generate.py"  # a file: vLLM's engine core is spawned and re-imports __main__
    script.write_text(
        "import json, sys, time\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    texts = json.load(open(sys.argv[1]))\n"
        "    t0 = time.perf_counter()\n"
        f"    llm = LLM(model=sys.argv[2], dtype='float32', kv_cache_memory_bytes={int(KV_GB * (1 << 30))}, seed=0)\n"
        "    t1 = time.perf_counter()\n"
        f"    outs = llm.generate(texts, SamplingParams(max_tokens={max_tokens}, temperature=0))\n"
        "    t2 = time.perf_counter()\n"
        "    tokens = sum(len(o.outputs[0].token_ids) for o in outs)\n"
        "    print('RESULT ' + json.dumps({'start': t1 - t0, 'generate': t2 - t1, 'tokens': tokens}), flush=True)\n"
    )
    (root / "texts.json").write_text(json.dumps(texts))
    out = subprocess.run(
        [sys.executable, str(script), str(root / "texts.json"), str(folder)], capture_output=True, text=True, check=True
    )
    base = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {
        "fabric_s": fabric_s,
        "fabric_tokens": result.generated_tokens,
        "llm_start_s": base["start"],
        "llm_generate_s": base["generate"],
        "llm_tokens": base["tokens"],
    }


def print_serving(args: argparse.Namespace, rows: dict[str, dict[int, list[tuple[float, float]]]]) -> None:
    """The serving table: vllm serve vs fabric on vLLM (paired), and fabric's transformers engine."""
    print(
        f"\nGPT-2 {args.layers}x{args.width} (fresh weights), fp32, {BURST} streamed requests x {args.max_tokens} "
        f"tokens per level, greedy; medians of {args.repeats} runs (vLLM sides paired); HAProxy fast path\n"
    )
    print("| concurrency | vllm serve tok/s | fabric (vLLM) tok/s | ratio | vllm serve TTFT ms | fabric TTFT ms "
          "| TTFT ratio | fabric (transformers) tok/s | transformers / vLLM |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        v, f, t = rows["vllm"][c], rows["fabric"][c], rows["transformers"][c]
        ratio = statistics.median(fr[0] / vr[0] for fr, vr in zip(f, v, strict=True))
        tratio = statistics.median(fr[1] / vr[1] for fr, vr in zip(f, v, strict=True))
        ftps = statistics.median(r[0] for r in f)
        ttps = statistics.median(r[0] for r in t) if t else float("nan")
        print(
            f"| {c} | {statistics.median(r[0] for r in v):,.0f} | {ftps:,.0f} | {ratio:.2f}x "
            f"| {statistics.median(r[1] for r in v) * 1000:,.0f} | {statistics.median(r[1] for r in f) * 1000:,.0f} "
            f"| {tratio:.2f}x | {ttps:,.0f} | {ttps / ftps:.2f}x |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=256, help="prompts of the batch-generation comparison")
    p.add_argument("--no-transformers", action="store_true", help="skip fabric's transformers engine")
    p.add_argument("--no-generate", action="store_true", help="skip the batch-generation comparison")
    args = p.parse_args()

    import ray

    from fabric.config import load_config
    from fabric.serve.llm import deploy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="fabric-vllm-bench-"))
    folder = build_model(root / "model", args.layers, args.width)
    texts = prompts(BURST)
    common = [
        f"run_dir={root}",
        f"llm.serve.model_path={folder}",
        "llm.serve.served_name=bench",
        "llm.serve.dtype=float32",
        f"llm.serve.kv_cache_gb={KV_GB}",
        f"llm.serve.max_batch_size={BURST}",
        "llm.serve.replica_cpus=0",
        "llm.serve.monitor=false",
        "cluster.num_cpus=2",
    ]
    cfg = load_config(None, [*common, f"llm.serve.port={free_port()}"])
    vport = free_port()
    server = start_vllm_server(cfg, vport, root / "vllm_serve.log")
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {
        k: {c: [] for c in args.concurrency} for k in ("vllm", "fabric", "transformers")
    }
    gen: dict[str, float] = {}
    try:
        url = deploy(cfg)  # a local Ray, the way `fabric serve-llm` starts one
        for _ in range(args.repeats):
            for c in args.concurrency:
                for side, u in (("vllm", f"http://127.0.0.1:{vport}"), ("fabric", url)):
                    tps, ttft, _ = asyncio.run(burst(u, texts, c, args.max_tokens))
                    rows[side][c].append((tps, ttft))
        stop(server)
        server = None
        if not args.no_transformers:
            tcfg = load_config(None, [*common, f"llm.serve.port={cfg.llm.serve.port}", "llm.serve.engine=transformers",
                                      "llm.serve.app_name=bench-tf", "llm.serve.route_prefix=/tf", "llm.serve.threads=2"])
            turl = deploy(tcfg)
            for _ in range(args.repeats):
                for c in args.concurrency:
                    rows["transformers"][c].append(asyncio.run(burst(turl, texts, c, args.max_tokens))[:2])
        print_serving(args, rows)
        from ray import serve

        serve.shutdown()  # the CPUs go to the generation comparison
        if not args.no_generate:
            gen = generation(cfg, folder, root, args.prompts, args.max_tokens)
    finally:
        if server is not None:
            stop(server)
        ray.shutdown()

    if gen:
        base = gen["llm_start_s"] + gen["llm_generate_s"]
        print(
            f"\nBatch generation, {args.prompts} prompts x {args.max_tokens} tokens: fabric generate "
            f"{gen['fabric_s']:.1f} s ({gen['fabric_tokens']:,} tokens, engine start and Ray Data included) vs "
            f"LLM.generate {gen['llm_generate_s']:.1f} s + {gen['llm_start_s']:.1f} s engine start "
            f"({gen['llm_tokens']:,} tokens): {base / gen['fabric_s']:.2f}x of the baseline's speed, start included"
        )


if __name__ == "__main__":
    main()
