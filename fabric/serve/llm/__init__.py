"""Language models over the OpenAI API on Ray Serve: vLLM on GPUs, a batching transformers engine on CPU.

Public surface:

* :func:`build_openai_app` — ``args -> serve.Application`` (``import_path: fabric.serve.llm.app:build_openai_app``)
* :func:`deploy` — deploy a config's app from the driver and return its base URL
* :func:`run` — the same, printing where it answers (``jobs/serve_llm.py``, ``fabric serve-llm``)
* :func:`serve_config` — the ``serve run``/``serve deploy`` file of a config
* ``protocol`` (wire models), ``engine`` (``LLMEngine`` ABC, ``choose_engine``), ``serving``, ``api``

Importing this package loads neither Ray nor torch nor vLLM.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fabric import storage

if TYPE_CHECKING:
    from ray.serve import Application

    from fabric.config import PipelineConfig

__all__ = ["build_openai_app", "deploy", "run", "serve_config"]

log = logging.getLogger("fabric.serve.llm")
DEPLOY_TIMEOUT_S = 600.0
MONITOR_FEATURES = ["prompt_tokens", "completion_tokens"]
# Handles of monitors started here: a non-detached actor lives while its creator holds a handle.
_monitors: dict[str, Any] = {}


def build_openai_app(args: Any = None) -> Application:
    """The Serve application of a pipeline config (see :func:`fabric.serve.llm.app.build_openai_app`)."""
    from fabric.serve.llm.app import build_openai_app as _build

    return _build(args)


def _as_serve(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``serve``'s host, port and fast path taken from ``llm.serve`` (what control's helpers read)."""
    s = cfg.llm.serve
    serve = cfg.serve.model_copy(update={"host": s.host, "port": s.port, "fast_path": s.fast_path})
    return cfg.model_copy(update={"serve": serve})


def app_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The declarative Serve application (``serve deploy``'s form) of ``cfg``."""
    from fabric.serve.llm.app import IMPORT_PATH, replica_config

    s = cfg.llm.serve
    return {"name": s.app_name, "route_prefix": s.route_prefix, "import_path": IMPORT_PATH, "args": replica_config(cfg)}


def serve_config(cfg: PipelineConfig, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole Serve config file for ``cfg`` (``serve run``/``serve deploy``, KubeRay's ``serveConfigV2``).

    Args:
        cfg: the pipeline config.
        args: the app's args instead of this machine's resolved config, e.g. ``{"config": "jobs/configs/x.yaml"}``.
    """
    from fabric.serve.llm.app import IMPORT_PATH
    from fabric.serve.spec import FAST_PATH_ENV

    s = cfg.llm.serve
    if args is None:
        app = app_config(cfg)
    else:  # portable: resolved where the app is built, so the model need not exist here
        app = {"name": s.app_name, "route_prefix": s.route_prefix, "import_path": IMPORT_PATH, "args": args}
    out: dict[str, Any] = {"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port}}
    if s.fast_path:
        out["controller_options"] = {"runtime_env": {"env_vars": dict(FAST_PATH_ENV)}}
    out["applications"] = [app]
    return out


def start_monitor(cfg: PipelineConfig) -> bool:
    """Start (or reuse) the serving stream's drift monitor over ``{run_dir}/llm/reference.parquet`` (a URI run_dir's
    is read from the bucket; the monitor checkpoints into ``{run_dir}/monitor/``).

    Returns:
        True when it runs; False when monitoring is off or fine-tuning left no reference (replicas then drop
        their samples, and ``/monitor/drift`` says the monitor is not running).
    """
    s = cfg.llm.serve
    if not (cfg.monitor.enabled and s.monitor):
        return False
    reference = storage.fetch(cfg.run_dir, "llm/reference.parquet")
    if not reference.is_file():
        where = storage.join(cfg.run_dir, "llm", "reference.parquet")
        log.warning("no drift reference at %s: the language-model stream is not monitored", where)
        return False
    import pandas as pd

    from fabric.monitor import start

    frame = pd.read_parquet(reference)
    features = [c for c in MONITOR_FEATURES if c in frame.columns]
    # Token counts are quantities: as floats Evidently compares their distributions (K-S / Wasserstein); as
    # integers with few values it would call them categories, and any length absent from a small reference
    # would read as drift.
    numeric = [c for c in frame.columns if pd.api.types.is_integer_dtype(frame[c])]
    frame[numeric] = frame[numeric].astype("float64")
    handle = start(
        cfg.monitor.model_copy(update={"actor_name": s.monitor_actor}),
        frame,
        features=features,
        checkpoint_path=storage.join(cfg.run_dir, "monitor", "llm_state.pkl"),
        run_dir=cfg.run_dir,
    )
    # Keep the first handle: a non-detached actor lives while its creator's handle does, and a second deploy in
    # this process (on the same cluster) gets another handle to the same actor.
    import ray

    ctx = ray.get_runtime_context()  # the cluster this process is on now (tests and notebooks start several)
    _monitors.setdefault(f"{ctx.gcs_address}/{ctx.get_node_id()}/{s.monitor_actor}", handle)
    return True


def deploy(cfg: PipelineConfig, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
    """Deploy (or update) ``cfg``'s OpenAI app on Serve, wait until it answers, and return its base URL.

    Checks a URI run_dir first (one line when the bucket cannot be written), connects to Ray (a local one when no
    cluster is configured), starts Serve on ``llm.serve.host:port`` (a running Serve keeps its own), starts the
    drift monitor, and deploys ``fabric.serve.llm.app:build_openai_app`` with this config next to the apps already
    there. OpenAI clients use ``base_url=<returned URL>/v1``.

    Raises:
        UsageError: the model or an adapter folder is missing.
        FabricError: a URI run_dir that cannot be written.
        ClusterError: the app failed to deploy (with Serve's reason).
    """
    from fabric.serve import control
    from fabric.serve.llm.app import resolved

    storage.check(cfg.run_dir)  # the monitor checkpoints there: an unreachable bucket fails here, in one line
    resolved(cfg)  # a readable error here rather than a traceback in Serve's status
    shim = _as_serve(cfg)
    control.connect(shim)
    http = control.start(shim)
    try:
        start_monitor(cfg)
    except Exception as e:  # serving does not depend on the monitor
        log.warning("the drift monitor did not start: %s", e)
    url = f"http://{http['host']}:{http['port']}{cfg.llm.serve.route_prefix.rstrip('/')}"
    control.put_app(app_config(cfg), url + "/health", timeout_s)
    return url


def run(cfg: PipelineConfig) -> str:
    """Deploy ``cfg``'s OpenAI app (see :func:`deploy`) and print where it answers; returns the base URL."""
    url = deploy(cfg)
    s = cfg.llm.serve
    log.info(f"serve-llm: {s.app_name} at {url}/v1 (OpenAI API)")
    for route in ("GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions", "GET /health", "GET /docs"):
        method, path = route.split()
        log.info(f"  {method} {url}{path}")
    if s.api_key_env:
        log.info(f"  API key: Authorization: Bearer ${s.api_key_env}")
    return url
