"""Language-model serving speed: fabric's OpenAI endpoint (batching CPU engine) vs plain ``model.generate``.

    python benchmarks/llm_serve.py [--concurrency 1 4 16] [--max-tokens 64] [--threads 1] [--layers 6] [--width 512]
        [--repeats 3] [--adapters 0] [--no-fast-path] [--set llm.serve.KEY=VALUE ...]

Both sides run the same freshly initialised GPT-2 (``--layers`` x ``--width``, byte-level BPE tokenizer trained
here; nothing downloaded) on the same number of torch threads, greedy, every request generating exactly
``--max-tokens`` tokens (the end-of-sequence logit is zeroed so no request stops early):

* ``fabric``: ``fabric.serve.llm.deploy`` on a local Ray; N concurrent clients stream completions over HTTP
  (SSE) from the real endpoint, a burst of 16 requests per concurrency level (16/N each, closed loop);
* ``baseline``: the same 16 prompts through ``model.generate`` one request at a time, in this process (no
  HTTP, so the baseline pays nothing for the network); a streamer timestamps each first token, and a request
  of a burst of N waits for the ones before it, as it would behind a one-at-a-time server.

With ``--adapters K``, K LoRA adapters (rank 8, random weights) are made too and the requests go round robin over
the base and them, on both sides (the baseline holds them all loaded and switches per request).

Output tokens/s is all completion tokens over the wall time of the burst; time to first token (TTFT) is the
median from sending a request to its first token. Each level runs ``--repeats`` times, a fabric burst then a
baseline burst, and the table shows medians (ratios are taken per pair, so load that drifts between pairs cancels).
The goal: >= 4x the baseline's tokens/s at 16 concurrent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fabric.runtime import free_port

BURST = 16
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "ray",
    "serve",
    "batches",
    "many",
    "tokens",
    "for",
    "each",
    "model",
    "request",
    "and",
    "the",
    "dog",
    "ran",
    "over",
    "green",
    "hills",
    "to",
    "find",
    "seven",
    "red",
    "apples",
    "under",
    "an",
    "old",
    "tree",
    "near",
    "the",
    "quiet",
    "river",
    "bank",
    "today",
]


def build_model(out: Path, layers: int, width: int, seed: int = 0) -> Path:
    """A fresh GPT-2 and a byte-level BPE tokenizer trained on generated lines, saved to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=512,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight[fast.eos_token_id] = 0.0  # every request runs to max_tokens on both sides
    model.save_pretrained(out)
    return out


def build_adapters(folder: Path, count: int) -> dict[str, str]:
    """``count`` LoRA adapters (rank 8 on ``c_attn``, random weights) of the model in ``folder``, saved beside it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    out = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
        path = folder.parent / f"adapter{i}"
        get_peft_model(GPT2LMHeadModel.from_pretrained(folder), lora).save_pretrained(path)
        out[f"adapter{i}"] = str(path)
    return out


def models_of(n: int, adapters: list[str]) -> list[str | None]:
    """Which adapter each of ``n`` requests uses, round robin over the base (None) and ``adapters``."""
    choices: list[str | None] = [None, *adapters]
    return [choices[i % len(choices)] for i in range(n)]


def prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


# --------------------------------------------------------------------------- fabric: the HTTP endpoint


async def _stream(
    client: Any, url: str, prompt: str, max_tokens: int, adapter: str | None = None
) -> tuple[float, float, int]:
    """One streamed completion: (seconds to the first token, seconds in all, completion tokens)."""
    body = {
        "model": "bench" if adapter is None else f"bench:{adapter}",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, tokens


async def _fabric_burst(
    url: str, texts: list[str], adapters: list[str | None], concurrency: int, max_tokens: int
) -> tuple[float, list[float], int, dict[str, int]]:
    """The burst over HTTP (request i through ``adapters[i]``): (wall seconds, TTFTs, completion tokens, the
    engine's step counters over the burst)."""
    import httpx

    work = list(zip(texts, adapters, strict=True))
    per_client = [work[i::concurrency] for i in range(concurrency)]
    ttfts: list[float] = []
    total = 0

    async def client_loop(client: Any, mine: list[tuple[str, str | None]]) -> None:
        nonlocal total
        for p, adapter in mine:
            ttft, _, n = await _stream(client, url, p, max_tokens, adapter)
            ttfts.append(ttft)
            total += n

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        await _stream(client, url, texts[0], 4)  # warm-up
        before = (await client.get(url + "/stats")).json()["engine"]
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, mine) for mine in per_client))
        wall = time.perf_counter() - start
        after = (await client.get(url + "/stats")).json()["engine"]
    steps = {k: after[k] - before[k] for k in ("steps", "rows_stepped", "joined")}
    return wall, ttfts, total, steps


# --------------------------------------------------------------------------- baseline: model.generate, one at a time


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _baseline_burst(
    folder: Path,
    texts: list[str],
    adapters: list[str | None],
    paths: dict[str, str],
    concurrency: int,
    max_tokens: int,
    state: dict,
) -> tuple[float, list[float], int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "model" not in state:
        state["tok"] = AutoTokenizer.from_pretrained(folder)
        state["model"] = AutoModelForCausalLM.from_pretrained(folder).eval()
        for name, path in paths.items():  # all loaded up front: switching is free, as on the fabric side
            state["model"].load_adapter(path, adapter_name=name)
    tok, model = state["tok"], state["model"]
    ttfts: list[float] = []
    total = 0
    start = time.perf_counter()
    # a burst of `concurrency` requests arrives at once; each waits for the ones served before it
    for group in range(0, len(texts), concurrency):
        arrived = time.perf_counter()
        for p, adapter in zip(texts[group : group + concurrency], adapters[group : group + concurrency], strict=True):
            if adapter is not None:
                model.set_adapter(adapter)
                model.enable_adapters()
            elif paths:
                model.disable_adapters()
            ids = tok(p, return_tensors="pt")
            streamer = _FirstToken()
            with torch.inference_mode():
                out = model.generate(
                    **ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    streamer=streamer, pad_token_id=tok.eos_token_id,
                )  # fmt: skip
            ttfts.append((streamer.first or time.perf_counter()) - arrived)
            total += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - start, ttfts, total


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="paired fabric/baseline runs per level (medians shown)")
    p.add_argument(
        "--adapters", type=int, default=0, help="LoRA adapters; requests go round robin over the base and them"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fabric config overrides (llm.serve.*)")
    p.add_argument(
        "--no-fast-path", action="store_true", help="Serve's Python proxy instead of the HAProxy fast path (default)"
    )
    args = p.parse_args()

    import ray
    import torch

    from fabric.config import load_config
    from fabric.serve.llm import deploy

    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="fabric-llm-bench-"))
    folder = build_model(root / "model", args.layers, args.width)
    texts = prompts(BURST)
    paths = build_adapters(folder, args.adapters)
    adapters = models_of(BURST, sorted(paths))

    cfg = load_config(
        None,
        [
            f"run_dir={root}",
            f"llm.serve.model_path={folder}",
            "llm.serve.served_name=bench",
            f"llm.serve.port={free_port()}",
            f"llm.serve.threads={args.threads}",
            f"llm.serve.max_batch_size={BURST}",
            "llm.serve.replica_cpus=0",
            f"llm.serve.fast_path={not args.no_fast_path}",
            "llm.serve.monitor=false",
            "cluster.num_cpus=2",
            *(f"llm.serve.adapters.{name}={path}" for name, path in paths.items()),
            f"llm.serve.max_loaded_adapters={max(1, args.adapters)}",
            *args.set,
        ],
    )
    url = deploy(cfg)  # starts a local Ray the way `fabric serve-llm` does
    state: dict[str, Any] = {}
    runs: dict[int, list[tuple[float, float, float, float, dict[str, int]]]] = {c: [] for c in args.concurrency}
    try:
        _baseline_burst(folder, texts[:1], [None], paths, 1, 4, state)  # warm-up
        # each fabric burst is paired with a baseline burst right after it, so both see the same machine load
        for _ in range(args.repeats):
            for c in args.concurrency:
                f_wall, f_ttft, f_tokens, steps = asyncio.run(_fabric_burst(url, texts, adapters, c, args.max_tokens))
                b_wall, b_ttft, b_tokens = _baseline_burst(folder, texts, adapters, paths, c, args.max_tokens, state)
                f_ttft_p50, b_ttft_p50 = statistics.median(f_ttft), statistics.median(b_ttft)
                runs[c].append((f_tokens / f_wall, b_tokens / b_wall, f_ttft_p50, b_ttft_p50, steps))
    finally:
        ray.shutdown()

    print(
        f"\nGPT-2 {args.layers}x{args.width} (fresh weights), {BURST} requests x {args.max_tokens} tokens per "
        f"level, greedy, {args.threads} torch thread(s) per side; medians of {args.repeats} paired runs; "
        f"Serve ingress: {'Python proxy' if args.no_fast_path else 'HAProxy fast path'}"
        + (f"; requests round robin over the base and {args.adapters} LoRA adapter(s)" if args.adapters else "")
        + "\n"
    )
    print(
        "| concurrency | fabric tok/s | generate tok/s | ratio (pairs' range) | fabric TTFT p50 ms "
        "| generate TTFT p50 ms | TTFT ratio | fabric rows/step | joined a running batch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, level in runs.items():
        f, b, ft, bt = (statistics.median(r[i] for r in level) for i in range(4))
        ratios = [r[0] / r[1] for r in level]  # per pair: load drift between runs cancels
        ratio = statistics.median(ratios)
        ttft_ratio = statistics.median(r[3] / r[2] for r in level)
        rows_stepped, steps = sum(r[4]["rows_stepped"] for r in level), sum(r[4]["steps"] for r in level)
        joined = sum(r[4]["joined"] for r in level) / len(level)
        print(
            f"| {c} | {f:,.0f} | {b:,.0f} | {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {ft * 1000:,.0f} "
            f"| {bt * 1000:,.0f} | {ttft_ratio:.2f}x | {rows_stepped / max(1, steps):.1f} | {joined:.1f} |"
        )


if __name__ == "__main__":
    main()
