"""The CPU engine: transformers + peft, with a background step loop that batches concurrent requests.

One thread owns the model. It takes waiting sequences of one adapter (up to ``max_batch_size``; the queue is
grouped by adapter, oldest first), prefills them together (left-padded, with an attention mask and position
ids), then decodes one token per row per step on the KV cache. Each row samples with its own parameters and
random generator, and finishes on its own (end of sequence, a stop sequence, ``max_tokens``, or its client
leaving); finished rows leave the cache so the others run on. A forward pass over 16 rows costs little more
than over one on a small model, which is where throughput under concurrency comes from.

LoRA adapters are loaded on demand (transformers' peft integration: ``load_adapter``) and the least recently
used is deleted when more than ``max_loaded_adapters`` would be held.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.errors import FabricError, UsageError
from fabric.serve.llm.engine import GenerationOutput, GenerationRequest, LLMEngine, ModelInfo
from fabric.serve.llm.text import TextStream

log = logging.getLogger("fabric.serve.llm")

_IDLE_POLL_S = 0.1


class EngineStoppedError(FabricError):
    """The engine was shut down (or its step loop died) while a request waited."""


@dataclass(eq=False)
class _Sequence:
    """One row: its request, where its outputs go, and its progress (touched by the step loop only)."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: TextStream
    generator: Any = None
    completion: int = 0
    done: bool = False
    cancelled: bool = False
    """Set by the consumer when it stops listening; the step loop drops the row."""
    enqueued_at: float = field(default_factory=time.monotonic)

    def post(self, item: GenerationOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            self.cancelled = True


class AdapterSlots:
    """Which LoRA adapters are loaded on a transformers model, least recently used first.

    Args:
        model: a transformers ``PreTrainedModel`` (its peft integration loads and deletes adapters).
        paths: adapter name -> peft folder.
        capacity: most adapters held at once.
    """

    def __init__(self, model: Any, paths: dict[str, str], capacity: int) -> None:
        self.model = model
        self.paths = dict(paths)
        self.capacity = capacity
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.loads = 0
        self.evictions = 0

    def use(self, name: str | None) -> None:
        """Make ``name`` the active adapter (loading it, and evicting the LRU one, as needed); None: the base."""
        if name is None:
            if self.loaded:
                self.model.disable_adapters()
            return
        if name not in self.paths:
            raise UsageError(f"unknown adapter {name!r}; configured: {', '.join(sorted(self.paths)) or 'none'}")
        if name not in self.loaded:
            while len(self.loaded) >= self.capacity:
                old, _ = self.loaded.popitem(last=False)
                self.model.delete_adapter(old)
                self.evictions += 1
                log.info("evicted LoRA adapter %s", old)
            self.model.load_adapter(self.paths[name], adapter_name=name)
            self.loads += 1
            log.info("loaded LoRA adapter %s from %s", name, self.paths[name])
        self.loaded[name] = None
        self.loaded.move_to_end(name)
        self.model.set_adapter(name)
        self.model.enable_adapters()


class TransformersEngine(LLMEngine):
    """The batching CPU engine (see the module's docstring)."""

    kind = "transformers"

    def __init__(self, cfg: Any, name: str) -> None:
        super().__init__(cfg, name)
        self.model: Any = None
        self.adapters: AdapterSlots | None = None
        self.max_model_len = 0
        self._eos: set[int] = set()
        self._pad = 0
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.counters = {"batches": 0, "steps": 0, "rows_stepped": 0, "max_batch_rows": 0, "generated_tokens": 0}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model and tokenizer from ``cfg.model_path`` and start the step loop."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(str(self.cfg.model_path))
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a Hugging Face model folder (no config.json)")
        threads = self.cfg.threads or max(1, int(self.cfg.replica_cpus))
        torch.set_num_threads(threads)
        dtype = torch.float32 if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()
        config = self.model.config
        own = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.max_model_len = min(own, self.cfg.max_model_len or own)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self._eos = set(eos)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else (eos[0] if eos else 0)
        self.adapters = AdapterSlots(self.model, self.cfg.adapters, self.cfg.max_loaded_adapters)
        self._thread = threading.Thread(target=self._loop, name="llm-step-loop", daemon=True)
        self._thread.start()

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, str(self.cfg.model_path), self.max_model_len, dict(self.cfg.adapters))

    async def check_health(self) -> None:
        if self._failure is not None:
            raise EngineStoppedError(f"the step loop died: {self._failure!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineStoppedError("the step loop is not running")

    def shutdown(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_pending(EngineStoppedError("the engine shut down"))

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        c["mean_batch_rows"] = c["rows_stepped"] / c["steps"] if c["steps"] else 0.0
        slots = self.adapters
        return {
            "engine": self.kind,
            **c,
            "waiting": len(self._pending),
            "loaded_adapters": list(slots.loaded) if slots else [],
            "adapter_loads": slots.loads if slots else 0,
            "adapter_evictions": slots.evictions if slots else 0,
        }

    # ------------------------------------------------------------------ the request side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._thread is None:
            raise EngineStoppedError("the engine is not started")
        if request.adapter is not None and request.adapter not in self.cfg.adapters:
            raise UsageError(f"unknown adapter {request.adapter!r}")
        import torch

        p = request.params
        gen = None
        if p.temperature > 0:
            gen = torch.Generator()
            if p.seed is not None:
                gen.manual_seed(p.seed)
            else:
                gen.seed()
        seq = _Sequence(request, asyncio.get_running_loop(), asyncio.Queue(), TextStream(self.tokenizer, p.stop), gen)
        with self._cond:
            if self._stopping.is_set():
                raise EngineStoppedError("the engine shut down")
            self._pending.append(seq)
            self._cond.notify()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # no-op when finished; frees the row when the consumer left early

    # ------------------------------------------------------------------ the step loop

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as e:  # one bad batch fails its requests, not the engine
                log.exception("generation failed")
                for seq in batch:
                    if not seq.done:
                        seq.done = True
                        seq.post(e)

    def _next_batch(self) -> list[_Sequence]:
        """The oldest waiting sequence's adapter group, up to ``max_batch_size`` (after a short wait to fill)."""
        size = self.cfg.max_batch_size
        with self._cond:
            if not self._pending:
                self._cond.wait(_IDLE_POLL_S)
            if not self._pending:
                return []
            deadline = time.monotonic() + self.cfg.batch_wait_s
            while len(self._pending) < size and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            live = [s for s in self._pending if not s.cancelled]
            if not live:
                self._pending.clear()
                return []
            adapter = live[0].request.adapter
            batch = [s for s in live if s.request.adapter == adapter][:size]
            chosen = set(map(id, batch))
            self._pending = collections.deque(s for s in live if id(s) not in chosen)
            return batch

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for seq in pending:
            seq.post(error)

    def _run(self, batch: list[_Sequence]) -> None:
        import torch

        assert self.adapters is not None
        with torch.inference_mode():
            self.adapters.use(batch[0].request.adapter)
            prompts = [s.request.prompt_ids for s in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            last = positions[:, -1]
            seqs = batch
            self.counters["batches"] += 1
            while True:
                self._count_step(len(seqs))
                tokens = self._sample(logits, seqs)
                step = [(s, self._advance(s, int(tokens[i]))) for i, s in enumerate(seqs)]
                _deliver([(s, out) for s, out in step if out is not None])
                keep = [i for i, (s, _) in enumerate(step) if not s.done]
                if not keep or self._stopping.is_set():
                    break
                if len(keep) < len(seqs):
                    index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(index)
                    mask, tokens, last = mask[index], tokens[index], last[index]
                    seqs = [seqs[i] for i in keep]
                mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.long)], dim=1)
                last = last + 1
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=last[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[:, -1, :]
        for s in seqs:
            if not s.done:  # shutting down mid-batch
                s.done = True
                s.post(EngineStoppedError("the engine shut down"))

    def _count_step(self, rows: int) -> None:
        c = self.counters
        c["steps"] += 1
        c["rows_stepped"] += rows
        c["max_batch_rows"] = max(c["max_batch_rows"], rows)

    def _sample(self, logits: Any, seqs: list[_Sequence]) -> Any:
        """One token per row: argmax for temperature 0, else top-p sampling with the row's own generator."""
        import torch

        tokens = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            p = s.request.params
            if p.temperature == 0:
                continue
            probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set of most likely tokens whose mass reaches top_p (always the first)
                sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= p.top_p] = 0.0
                tokens[i] = order[torch.multinomial(sorted_probs, 1, generator=s.generator)[0]]
            else:
                tokens[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return tokens

    def _advance(self, seq: _Sequence, token: int) -> GenerationOutput | None:
        """Hand one new token to its sequence: its output, or None when the consumer left (the row is done)."""
        if seq.cancelled:
            seq.done = True
            return None
        seq.completion += 1
        self.counters["generated_tokens"] += 1
        finish = None
        if token in self._eos:
            text, finish = seq.stream.flush(), "stop"
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                finish = "stop"
            elif seq.completion >= seq.request.params.max_tokens:
                text, finish = text + seq.stream.flush(), "length"
        if finish is not None:
            seq.done = True
        return GenerationOutput(text, [token], seq.completion, finish)


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _deliver(outputs: list[tuple[_Sequence, GenerationOutput]]) -> None:
    """Hand a step's outputs to their consumers: one wake-up per event loop, not one per row."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, GenerationOutput]]] = {}
    for seq, out in outputs:
        by_loop.setdefault(seq.loop, []).append((seq, out))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, [(seq.queue, out) for seq, out in items])
        except RuntimeError:  # the consumers' event loop is closed
            for seq, _ in items:
                seq.cancelled = True
