"""The CPU engine: transformers + peft, with a background step loop that batches concurrent requests continuously.

One thread owns the model. It takes the waiting sequences that fit a batch with the oldest one (up to
``max_batch_size``), prefills them together (left-padded, with an attention mask and position ids), then decodes
one token per row per step on the KV cache. Before each step, fitting requests that arrived meanwhile join the
running batch: they are prefilled on their own, their first tokens sent at once, and their KV cache is merged into
the batch's (both left-padded to one width, concatenated along the rows), so a newcomer waits one step, not for
the batch to finish. A request at the head of the queue that does not fit stops the joining, so the batch drains
and that request goes next. Each row samples with its own parameters and random generator, and finishes on its
own (end of sequence, a stop sequence, ``max_tokens``, or its client leaving); finished rows leave the cache so
the others run on. A forward pass over 16 rows costs little more than over one on a small model, which is where
throughput under concurrency comes from. Log probabilities (log-softmax of the raw logits, as vLLM's
``raw_logprobs``) are computed only for the rows that ask: the prompt's from the prefill's logits, each new token's
from its step's.

What fits: rows of the base and of up to ``max_loaded_adapters`` LoRA adapters share a batch, each row through
its own adapter (peft's mixed-adapter batches). An adapter that also saves whole modules (``modules_to_save``),
trains token rows or uses DoRA cannot mix, since peft would apply those to every row (or refuses): its requests
form batches of their own.

LoRA adapters are loaded on demand (transformers' peft integration: ``load_adapter``) and the least recently
used is deleted when more than ``max_loaded_adapters`` would be held.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.errors import FabricError, UsageError
from fabric.serve.llm.engine import GenerationOutput, GenerationRequest, LLMEngine, ModelInfo, TokenLogprob
from fabric.serve.llm.text import TextStream

log = logging.getLogger("fabric.serve.llm")

_IDLE_POLL_S = 0.1
_LOGPROB_FLOOR = -9999.0
"""What a log probability of minus infinity is reported as (JSON has no infinity; OpenAI's and vLLM's choice)."""


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
    prompt_logprobs: list[TokenLogprob] | None = None
    """The prompt's scores (when asked), until the first output carries them."""

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


BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""
_UNSET = object()
_MIXED = object()


def mixes(folder: str) -> bool:
    """Whether the peft adapter in ``folder`` can share a batch with others: plain LoRA, without whole-module
    copies (``modules_to_save``), trained token rows or DoRA, which peft applies to a whole batch or refuses to
    mix. An unreadable config cannot."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    plain = config.get("peft_type", "LORA") == "LORA" and not config.get("use_dora")
    return plain and not config.get("modules_to_save") and not config.get("trainable_token_indices")


class AdapterSlots:
    """Which LoRA adapters are loaded on a transformers model, least recently used first, and which rows use which.

    A forward pass either runs one adapter for every row (:meth:`use`), or gives each row its own adapter or the
    base (:meth:`mix`: peft's mixed-adapter batches, the ``adapter_names`` argument of its LoRA layers, passed by a
    pre-forward hook). Adapters that also replace whole modules (``modules_to_save``) cannot mix: peft applies a
    module copy to every row of a batch (see :func:`mixes`).

    Args:
        model: a transformers ``PreTrainedModel`` (its peft integration loads and deletes adapters).
        paths: adapter name -> peft folder.
        capacity: most adapters held at once.
    """

    def __init__(self, model: Any, paths: dict[str, str], capacity: int) -> None:
        self.model = model
        self.paths = dict(paths)
        self.capacity = capacity
        self.exclusive = {name for name, folder in self.paths.items() if not mixes(folder)}
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.loads = 0
        self.evictions = 0
        self._rows: list[str] | None = None
        """Each row's adapter (``BASE``: none) for the LoRA layers' hook; None: the active adapter for all rows."""
        self._active: str | None | object = _UNSET

    def mixable(self, name: str | None) -> bool:
        """Whether rows of ``name`` (None: the base) may share a forward pass with other adapters' rows."""
        return name not in self.exclusive

    def use(self, name: str | None) -> None:
        """Make ``name`` the adapter of every row (loading it, and evicting the LRU one, as needed); None: the base."""
        self._rows = None
        if name is not None:
            self._load({name})
        self._activate(name)

    def mix(self, rows: list[str | None], keep: set[str] | None = None) -> None:
        """Give the next forward passes' rows these adapters (None: the base), loading them as needed.

        Args:
            rows: one adapter per row, all mixable.
            keep: adapters that must stay loaded besides (the running batch's).
        """
        wanted = {name for name in rows if name is not None}
        self._load(wanted, protect=wanted | (keep or set()))
        self._rows = [BASE if name is None else name for name in rows] if wanted else None
        self._activate(_MIXED if wanted else None)

    def _activate(self, name: str | None | object) -> None:
        """Point every adapter layer at ``name``: one adapter for all rows, None for the base, or ``_MIXED`` (LoRA
        layers follow the per-row names, module copies stay off). A no-op when nothing changes."""
        if name == self._active:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper

        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):  # a module copy serves only its own adapter's batches
                own = isinstance(name, str) and name in module._adapters
                if own:
                    module.set_adapter(name)
                module.enable_adapters(own)
            elif isinstance(module, BaseTunerLayer):
                if isinstance(name, str):
                    module.set_adapter(name)
                module.enable_adapters(name is not None)
        self._active = name

    def _load(self, names: set[str], protect: set[str] | None = None) -> None:
        protect = protect if protect is not None else names
        for name in sorted(names - set(self.loaded)):
            if name not in self.paths:
                raise UsageError(f"unknown adapter {name!r}; configured: {', '.join(sorted(self.paths)) or 'none'}")
            while len(self.loaded) >= self.capacity:
                old = next((a for a in self.loaded if a not in protect), None)
                if old is None:
                    raise FabricError(f"more than max_loaded_adapters={self.capacity} adapters in one batch")
                del self.loaded[old]
                self.model.delete_adapter(old)
                self._active = _UNSET
                self.evictions += 1
                log.info("evicted LoRA adapter %s", old)
            self.model.load_adapter(self.paths[name], adapter_name=name)
            self._active = _UNSET
            self.loads += 1
            log.info("loaded LoRA adapter %s from %s", name, self.paths[name])
            self._hook_lora_layers()
        for name in names:
            self.loaded[name] = None
            self.loaded.move_to_end(name)

    def _hook_lora_layers(self) -> None:
        """Hand each row's adapter to every LoRA layer (new ones appear as adapters load) while :meth:`mix` says."""
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_fabric_rows_hook", False):
                module.register_forward_pre_hook(self._pass_rows, with_kwargs=True)
                module._fabric_rows_hook = True

    def _pass_rows(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self._rows is not None:
            kwargs["adapter_names"] = self._rows
        return args, kwargs


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
        """The waiting sequences that fit a batch with the oldest one (see :meth:`_admits`), up to
        ``max_batch_size``; when the queue was empty, after waiting up to ``batch_wait_s`` for it to fill."""
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
            head = live[0].request.adapter
            mixed, names = self.adapters.mixable(head), set()  # type: ignore[union-attr]
            batch = []
            for seq in live:
                if len(batch) == size:
                    break
                if self._admits(seq, head, mixed, names):
                    batch.append(seq)
            chosen = set(map(id, batch))
            self._pending = collections.deque(s for s in live if id(s) not in chosen)
            return batch

    def _admits(self, seq: _Sequence, only: str | None, mixed: bool, names: set[str]) -> bool:
        """Whether ``seq`` fits a batch that runs adapter ``only`` on every row (``mixed`` False), or that mixes
        the adapters ``names`` (at most ``max_loaded_adapters``; its adapter is added to them when it fits)."""
        adapter = seq.request.adapter
        if not mixed:
            return adapter == only
        if not self.adapters.mixable(adapter):  # type: ignore[union-attr]
            return False
        if adapter is None or adapter in names:
            return True
        if len(names) >= self.cfg.max_loaded_adapters:
            return False
        names.add(adapter)
        return True

    def _joiners(self, only: str | None, mixed: bool, names: set[str], room: int) -> list[_Sequence]:
        """Waiting sequences that fit the running batch (see :meth:`_admits`) from the head of the queue, up to
        ``room``, without waiting.

        Stops at the first sequence that does not fit, so a stream of fitting requests cannot keep the batch
        running forever while another adapter's request waits: the batch drains and that one goes next.
        """
        with self._cond:
            taken: list[_Sequence] = []
            while self._pending and len(taken) < room:
                seq = self._pending[0]
                if not seq.cancelled and not self._admits(seq, only, mixed, names):
                    break
                self._pending.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for seq in pending:
            seq.post(error)

    def _run(self, members: list[_Sequence]) -> None:
        """Decode ``members`` until every row is done, letting fitting new requests join at each step.

        Newcomers are prefilled on their own (left-padded), their first tokens sampled and sent at once, and their
        KV cache merged into the running batch's (see :meth:`_Rows.extend`), so the next decode step covers them.
        A batch either mixes the base and adapters without module copies, each row through its own, or runs one
        adapter that copies modules on every row.
        """
        import torch

        slots = self.adapters
        assert slots is not None
        only = members[0].request.adapter
        mixed = slots.mixable(only)
        with torch.inference_mode():
            if not mixed:
                slots.use(only)
            rows: _Rows | None = None
            newcomers = list(members)
            while True:
                if newcomers and mixed:
                    slots.mix([s.request.adapter for s in newcomers], keep=_adapters(rows.seqs) if rows else set())
                if rows is None:  # a new batch starts
                    self.counters["batches"] += 1
                    rows = self._prefill(newcomers)
                elif newcomers:
                    self.counters["joined"] += len(newcomers)
                    fresh = self._prefill(newcomers)
                    if fresh is not None:
                        rows.extend(fresh)
                if rows is None or self._stopping.is_set():
                    break
                if mixed:
                    slots.mix([s.request.adapter for s in rows.seqs])
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
                if rows is None:  # all done: the next batch is picked afresh, whatever it holds
                    break
                room = self.cfg.max_batch_size - len(rows.seqs)
                newcomers = self._joiners(only, mixed, _adapters(rows.seqs), room) if rows.joinable else []
                members[:] = [s for s in members if not s.done] + newcomers  # a busy batch may run for hours
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
        for i, s in enumerate(seqs):
            k = s.request.params.prompt_logprobs
            if k is not None and len(prompts[i]) > 1:
                # column c predicts column c + 1: the prompt's tokens after the first, from its own columns
                lp = torch.log_softmax(out.logits[i, width - len(prompts[i]) : width - 1].float(), dim=-1)
                s.prompt_logprobs = _scored(lp, prompts[i][1:], k)
        rows = _Rows(list(seqs), out.past_key_values, mask, positions[:, -1], tokens=ids[:, -1])  # _emit samples them
        return self._emit(rows, out.logits[:, -1, :])

    def _emit(self, rows: _Rows, logits: Any) -> _Rows | None:
        """Sample each row's next token from ``logits``, send it, and drop the rows that are done (None: all are)."""
        self._count_step(len(rows.seqs))
        rows.tokens = self._sample(logits, rows.seqs)
        scores = _score(logits, rows.tokens, rows.seqs)
        step = [(s, self._advance(s, int(rows.tokens[i]), scores.get(i))) for i, s in enumerate(rows.seqs)]
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

    def _advance(self, seq: _Sequence, token: int, scored: TokenLogprob | None) -> GenerationOutput | None:
        """Hand one new token (and its score, when asked) to its sequence: its output, or None when the consumer
        left (the row is done). A sequence of ``max_tokens`` 0 ends here without it (only its prompt's scores)."""
        if seq.cancelled:
            seq.done = True
            return None
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        if seq.request.params.max_tokens == 0:
            seq.done = True
            return GenerationOutput("", [], 0, "length", prompt_logprobs=prompt_logprobs)
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
        logprobs = None if scored is None else [scored]
        return GenerationOutput(text, [token], seq.completion, finish, logprobs, prompt_logprobs)


def _scored(logprobs: Any, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each place's entry: ``tokens[j]``'s log probability in row j of ``logprobs`` ``[places, vocab]``
    (log-softmax), with the ``k`` most likely tokens there."""
    import torch

    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0]
    values = chosen.clamp(min=_LOGPROB_FLOOR).tolist()
    if not k:
        return [TokenLogprob(t, v) for t, v in zip(tokens, values, strict=True)]
    top_values, top_ids = logprobs.topk(k, dim=-1)
    top_values = top_values.clamp(min=_LOGPROB_FLOOR)
    tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
    return [TokenLogprob(t, v, top) for t, v, top in zip(tokens, values, tops, strict=True)]


def _score(logits: Any, tokens: Any, seqs: list[_Sequence]) -> dict[int, TokenLogprob]:
    """Row -> the sampled token's score, for the rows that ask for log probabilities (none: nothing computed).

    Rows asking for different numbers of alternatives are scored with the most asked, then cut to their own."""
    asked = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
    if not asked:
        return {}
    import torch

    k = max(seqs[i].request.params.logprobs or 0 for i in asked)
    lp = torch.log_softmax(logits[asked].float(), dim=-1)
    scored = _scored(lp, [int(tokens[i]) for i in asked], k)
    return {
        i: TokenLogprob(s.token_id, s.logprob, s.top[: seqs[i].request.params.logprobs])
        for i, s in zip(asked, scored, strict=True)
    }


def _adapters(seqs: list[_Sequence]) -> set[str]:
    """The adapters rows use (the base is none)."""
    return {s.request.adapter for s in seqs if s.request.adapter is not None}


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
