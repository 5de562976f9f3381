"""The Ray Serve shell of the language-model endpoint, and its app builder.

``build_openai_app(args) -> Application`` is what ``fabric serve-llm``, :func:`fabric.serve.llm.deploy` and
``serve run`` YAMLs (``import_path: fabric.serve.llm.app:build_openai_app``) deploy. A replica serves either
vLLM's own OpenAI app over vLLM's engine (CPU or GPU: wherever vLLM is installed), or, where vLLM is absent,
fabric's OpenAI layer over the batching transformers engine; fabric's additions wrap both
(:mod:`fabric.serve.llm.api`). The model folder and the adapters may be in a bucket (a URI run_dir's ``llm/``, or
URIs in ``llm.serve``): each replica copies them onto its own node before its engine starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve import Application

from fabric import storage
from fabric.errors import UsageError
from fabric.serve.spec import config_from_args

if TYPE_CHECKING:
    from fabric.config import PipelineConfig
    from fabric.config.llm_serve import LLMServeConfig

log = logging.getLogger("fabric.serve.llm")

DEPLOYMENT = "LLMServer"
IMPORT_PATH = "fabric.serve.llm.app:build_openai_app"


def model_folder(cfg: PipelineConfig) -> str:
    """The model folder to serve, an absolute path or a URI: ``llm.serve.model_path``, else ``{run_dir}/llm/merged``
    if fine-tuning wrote it, else ``{run_dir}/llm/base``."""
    s = cfg.llm.serve
    if s.model_path:
        return storage.join(s.model_path)
    merged = storage.join(cfg.run_dir, "llm", "merged")
    return merged if storage.exists(storage.join(merged, "config.json")) else storage.join(cfg.run_dir, "llm", "base")


def resolved(cfg: PipelineConfig) -> dict[str, Any]:
    """``cfg.llm.serve`` with the model folder, served name and adapter folders resolved (absolute paths or URIs)
    and checked.

    Raises:
        UsageError: the model folder or an adapter folder is missing, is not one, or its bucket cannot be read.
        FabricError: the model comes from a URI run_dir that cannot be written (one line naming it).
    """
    s = cfg.llm.serve
    if not s.model_path:
        storage.check(cfg.run_dir)  # an unreachable or unauthorised bucket fails here, in one line
    folder = model_folder(cfg)
    if not _holds(folder, "config.json", "llm.serve.model_path"):
        hint = "" if s.model_path else " (fine-tune first: `python jobs/finetune.py`, or set llm.serve.model_path)"
        raise UsageError(f"llm.serve.model_path: no Hugging Face model folder at {folder}{hint}")
    adapters = {}
    for name, path in s.adapters.items():
        p = storage.join(path)
        if not _holds(p, "adapter_config.json", f"llm.serve.adapters.{name}"):
            raise UsageError(f"llm.serve.adapters.{name}: no peft adapter folder (adapter_config.json) at {p}")
        adapters[name] = p
    name = s.served_name or (Path(folder).name if s.model_path else cfg.llm.finetune.model_name)
    from fabric.serve.llm.engine import engine_kind

    if adapters and engine_kind(s) == "vllm":
        from fabric.serve.llm.vllm_engine import check_adapters

        check_adapters(s.model_copy(update={"adapters": adapters}))
    return {**s.model_dump(mode="json"), "model_path": str(folder), "served_name": name, "adapters": adapters}


def _holds(folder: str, file: str, field: str) -> bool:
    """Whether ``folder`` (a path or a URI) has ``file``; a bucket that cannot be read (no endpoint, wrong keys) is
    a UsageError naming ``field`` and the cause in one line."""
    try:
        return storage.exists(storage.join(folder, file))
    except OSError as e:
        raise UsageError(f"{field}: cannot read {folder}: {str(e).strip().splitlines()[0]}") from None


def replica_gpus(cfg: PipelineConfig) -> float:
    """GPUs a replica reserves: ``replica_gpus``, else ``tensor_parallel_size`` when vLLM will run and the cluster
    has that many GPUs (vLLM's CPU build on a CPU-only cluster reserves none)."""
    s = cfg.llm.serve
    if s.replica_gpus is not None:
        return s.replica_gpus
    if s.engine == "transformers":
        return 0.0
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= s.tensor_parallel_size:
        return float(s.tensor_parallel_size)
    return 0.0


def replica_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The part of the config a replica needs, with absolute paths or URIs (replicas' working directories differ, and
    each reads a bucket on its own node)."""
    return {
        "name": cfg.name,
        "run_dir": storage.join(cfg.run_dir),
        "seed": cfg.seed,
        "monitor": cfg.monitor.model_dump(mode="json"),
        "llm": {"finetune": {"model_name": cfg.llm.finetune.model_name}, "serve": resolved(cfg)},
    }


def deployment_options(cfg: PipelineConfig) -> dict[str, Any]:
    """``Deployment.options(...)`` from ``cfg.llm.serve``.

    The API key's variable, when set here, is handed to the replicas' environment (so they need not share
    this process's); its value is then part of the app's config on the cluster.
    """
    s = cfg.llm.serve
    actor: dict[str, Any] = {"num_cpus": s.replica_cpus}
    gpus = replica_gpus(cfg)
    if gpus:
        actor["num_gpus"] = gpus
    if s.api_key_env and os.environ.get(s.api_key_env):
        actor["runtime_env"] = {"env_vars": {s.api_key_env: os.environ[s.api_key_env]}}
    if s.autoscaling is None:
        scale: dict[str, Any] = {"num_replicas": s.num_replicas}
    else:
        a = s.autoscaling
        auto = a.model_dump(exclude_none=True)
        auto.setdefault("target_ongoing_requests", float(s.max_batch_size))
        scale = {"autoscaling_config": auto}
    return {
        **scale,
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": actor,
        "logging_config": {"enable_access_log": False},
        # a first request may wait on a model load or a LoRA load: health checks get time too
        "health_check_timeout_s": 60.0,
    }


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class LLMServer:
    """A replica: vLLM's OpenAI app over its engine, or fabric's over the transformers engine, with fabric's
    additions (API key, ``/stats``, ``/monitor``, last-resort errors).

    Args:
        config: :func:`replica_config` of the pipeline config.
    """

    async def __init__(self, config: dict[str, Any]) -> None:
        from fabric.config import PipelineConfig, validate
        from fabric.serve.llm.engine import engine_kind

        cfg = validate(config, PipelineConfig, "<replica config>")
        s: LLMServeConfig = cfg.llm.serve
        name = s.served_name or Path(str(s.model_path)).name
        s = await asyncio.to_thread(on_this_node, s)  # a bucket's model: downloaded without blocking the replica's loop
        monitor = _monitor(cfg)
        self.api_key = os.environ.get(s.api_key_env) if s.api_key_env else None
        self.server: Any
        if engine_kind(s) == "vllm":
            from fabric.serve.llm.vllm_engine import VLLMServer

            from fabric.serve.llm.api import add_health

            self.server = VLLMServer(s, name, monitor)
            self.api = await self.server.start()
            add_health(self.api, self.server.check_health, name, self.server.kind)
            stats = self.server.stats
        else:
            from fabric.serve.llm.api import make_api
            from fabric.serve.llm.serving import OpenAIServing
            from fabric.serve.llm.transformers_engine import TransformersEngine

            self.server = TransformersEngine(s, name)
            self.server.start()
            serving = OpenAIServing(self.server, s, monitor)
            self.api = make_api(serving)
            stats = serving.stats
        from fabric.serve.llm.api import add_routes

        add_routes(self.api, stats, monitor)
        log.info("serving %s on the %s engine", name, self.server.kind)

    def __serve_build_asgi_app__(self) -> Any:
        from fabric.serve.llm.api import wrap

        return wrap(self.api, self.api_key)

    async def check_health(self) -> None:
        await self.server.check_health()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()


def on_this_node(s: LLMServeConfig) -> LLMServeConfig:
    """``s`` with its model folder and adapters as folders on this node: a bucket's are copied here (again only
    when the bucket's files changed), local ones stay."""
    return s.model_copy(
        update={
            "model_path": str(storage.localize(str(s.model_path))),
            "adapters": {name: str(storage.localize(path)) for name, path in s.adapters.items()},
        }
    )


def _monitor(cfg: PipelineConfig) -> Any:
    from fabric.serve.monitor_hook import NoMonitor, monitor_hook

    s = cfg.llm.serve
    if not s.monitor:
        return NoMonitor("the language-model drift monitor is disabled (llm.serve.monitor=false)")
    return monitor_hook(
        cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"actor_name": s.monitor_actor})})
    )


def build_openai_app(args: Any = None) -> Application:
    """The OpenAI-compatible Serve application of a pipeline config.

    Args:
        args: a PipelineConfig, or a mapping with ``config`` (a pipeline YAML path), ``overrides``
            (``["llm.serve.model_path=runs/llm/merged", ...]``) and/or inline sections (``llm: {serve: {...}}``).

    Raises:
        ConfigError: the config is invalid.
        UsageError: the model or an adapter folder is missing (checked here, before any replica starts).
    """
    cfg = config_from_args(args)
    return LLMServer.options(**deployment_options(cfg)).bind(replica_config(cfg))
