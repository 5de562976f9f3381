"""The CPU engine: transformers + peft, with a background step loop that batches concurrent requests continuously.

One thread owns the model. It takes waiting sequences of one adapter (up to ``max_batch_size``; the queue is
grouped by adapter, oldest first), prefills them together (left-padded, with an attention mask and position
ids), then decodes one token per row per step on the KV cache. Before each step, requests of the same adapter
that arrived meanwhile join the running batch: they are prefilled on their own, their first tokens sent at once,
and their KV cache is merged into the batch's (both left-padded to one width, concatenated along the rows), so a
newcomer waits one step, not for the batch to finish. A request of another adapter at the head of the queue stops
the joining, so the batch drains and that adapter goes next. Each row samples with its own parameters and random
generator, and finishes on its own (end of sequence, a stop sequence, ``max_tokens``, or its client leaving);
finished rows leave the cache so the others run on. A forward pass over 16 rows costs little more than over one
on a small model, which is where throughput under concurrency comes from.

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


@dataclass(eq=False)
class _Rows:
    """The running batch: its sequences and, row for row, the model state decoding continues from.

    Rows are right-aligned (left padding, marked 0 in ``mask``), so every row's newest token is in the last
    column and ``last`` holds each row's own position id.
    """

    seqs: list[_Sequence]
    cache: Any
    """The KV cache (a transformers ``DynamicCache``, keys and values ``[rows, heads, width, head_dim]``)."""
    mask: Any
    """``[rows, width]`` attention mask: 1 for a real token, 0 for padding."""
    last: Any
    """``[rows]`` position id of each row's newest token in the cache."""
    tokens: Any
    """``[rows]`` each row's sampled token, the input of the next step."""

    @property
    def joinable(self) -> bool:
        """Whether other rows can be merged in: plain per-layer caches (not sliding-window, quantized, ...)."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(self.cache, "layers", [None]))

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``, then drop the leading columns that are padding in every row left."""
        import torch

        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.last, self.tokens = self.mask[index], self.last[index], self.tokens[index]
        self.seqs = [self.seqs[i] for i in keep]
        first = int(self.mask.any(dim=0).long().argmax())  # the longest remaining row starts here
        if first > 0 and self.joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def extend(self, other: _Rows) -> None:
        """Append ``other``'s rows: left-pad the narrower side's cache and mask to one width, concatenate rows."""
        import torch
        from torch.nn.functional import pad

        width = max(self.mask.shape[1], other.mask.shape[1])
        grow, grow_other = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            # padded positions hold zeros and are masked out, so they never reach a row's attention
            mine.keys = torch.cat([pad(mine.keys, (0, 0, grow, 0)), pad(theirs.keys, (0, 0, grow_other, 0))])
            mine.values = torch.cat([pad(mine.values, (0, 0, grow, 0)), pad(theirs.values, (0, 0, grow_other, 0))])
        self.mask = torch.cat([pad(self.mask, (grow, 0)), pad(other.mask, (grow_other, 0))])
        self.last = torch.cat([self.last, other.last])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.seqs = self.seqs + other.seqs


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
        self.counters = {
            "batches": 0,
            "joined": 0,
            "steps": 0,
            "rows_stepped": 0,
            "max_batch_rows": 0,
            "generated_tokens": 0,
        }

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
            members = list(batch)  # grows as requests join the running batch
            try:
                self._run(members)
            except Exception as e:  # one bad batch fails its requests, not the engine
                log.exception("generation failed")
                for seq in members:
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

    def _joiners(self, adapter: str | None, room: int) -> list[_Sequence]:
        """Waiting sequences of ``adapter`` from the head of the queue, up to ``room``, without waiting.

        Stops at the first sequence of another adapter, so a stream of one adapter's requests cannot keep the
        batch running forever while another adapter's request waits: the batch drains and that one goes next.
        """
        with self._cond:
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            taken: list[_Sequence] = []
            while self._pending and len(taken) < room and self._pending[0].request.adapter == adapter:
                seq = self._pending.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for seq in pending:
            seq.post(error)

    def _run(self, members: list[_Sequence]) -> None:
        """Decode ``members`` until every row is done, letting the same adapter's new requests join at each step.

        Newcomers are prefilled on their own (left-padded), their first tokens sampled and sent at once, and their
        KV cache merged into the running batch's (see :meth:`_Rows.extend`), so the next decode step covers them.
        """
        import torch

        assert self.adapters is not None
        adapter = members[0].request.adapter
        with torch.inference_mode():
            self.adapters.use(adapter)
            rows: _Rows | None = None
            newcomers = list(members)
            while True:
                if newcomers and rows is None:  # nothing running: a new batch starts
                    self.counters["batches"] += 1
                    rows = self._prefill(newcomers)
                elif newcomers:
                    self.counters["joined"] += len(newcomers)
                    fresh = self._prefill(newcomers)
                    if fresh is not None:
                        rows.extend(fresh)
                if rows is None or self._stopping.is_set():
                    break
                rows.mask = torch.cat([rows.mask, torch.ones((len(rows.seqs), 1), dtype=torch.long)], dim=1)
                rows.last = rows.last + 1
                out = self.model(
                    input_ids=rows.tokens[:, None],
                    attention_mask=rows.mask,
                    position_ids=rows.last[:, None],
                    past_key_values=rows.cache,
                    use_cache=True,
                )
                rows.cache = out.past_key_values
                rows = self._emit(rows, out.logits[:, -1, :])
                room = self.cfg.max_batch_size - (len(rows.seqs) if rows else 0)
                newcomers = self._joiners(adapter, room) if rows is None or rows.joinable else []
                members[:] = [s for s in members if not s.done] + newcomers  # a busy batch may run for hours
                if rows is None and not newcomers:
                    break
        for s in members:
            if not s.done:  # shutting down mid-batch
                s.done = True
                s.post(EngineStoppedError("the engine shut down"))

    def _prefill(self, seqs: list[_Sequence]) -> _Rows | None:
        """Run the prompts of ``seqs`` together (left-padded) and send their first tokens; None when all are done."""
        import torch

        prompts = [s.request.prompt_ids for s in seqs]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        rows = _Rows(list(seqs), out.past_key_values, mask, positions[:, -1], tokens=ids[:, -1])  # _emit samples them
        return self._emit(rows, out.logits[:, -1, :])

    def _emit(self, rows: _Rows, logits: Any) -> _Rows | None:
        """Sample each row's next token from ``logits``, send it, and drop the rows that are done (None: all are)."""
        self._count_step(len(rows.seqs))
        rows.tokens = self._sample(logits, rows.seqs)
        step = [(s, self._advance(s, int(rows.tokens[i]))) for i, s in enumerate(rows.seqs)]
        _deliver([(s, out) for s, out in step if out is not None])
        keep = [i for i, s in enumerate(rows.seqs) if not s.done]
        if not keep:
            return None
        if len(keep) < len(rows.seqs):
            rows.select(keep)
        return rows

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
