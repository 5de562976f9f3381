"""The Ray Serve shell: one ingress deployment holding every version, and the app builder.

``build_app(args) -> Application`` is what ``fabric serve``, ``serve run cluster/serve.yaml``
(``import_path: fabric.serve.app:build_app``) and the pipeline's serve stage all deploy.

Each replica holds all versions of the (small, tabular) model in-process, each behind its own
``@serve.batch`` queue, so a traffic split costs no extra network hop; the split's weights are the
deployment's ``user_config``, which Serve hands to live replicas through ``reconfigure`` without a restart.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from fabric.errors import UsageError
from fabric.serve.spec import DEPLOYMENT, config_from_args, deployment_options, replica_config, serving_versions

log = logging.getLogger("fabric.serve")


def _log_through_serve() -> None:
    """Send fabric.serve's log lines to the replica's own log (Serve's handlers on ``ray.serve``), where they
    carry the request id Serve tags its lines with; a 500's request id is then found next to the error."""
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in log.handlers:
            log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class TabularModel:
    """A replica: the service (engines, batchers, traffic split) and its FastAPI app.

    Args:
        config: :func:`fabric.serve.spec.replica_config` of the pipeline config.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from fabric.config import PipelineConfig, validate
        from fabric.serve.metrics import start_metrics
        from fabric.serve.service import build_service

        _log_through_serve()
        self.cfg = validate(config, PipelineConfig, "<replica config>")
        self.service = build_service(self.cfg, batch=serve.batch)
        self.metrics = start_metrics(self.service)

    def __serve_build_asgi_app__(self) -> Any:
        from fabric.serve.api import make_asgi

        return make_asgi(self.service, self.cfg.serve.max_body_bytes)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New traffic weights from ``user_config["traffic"]``; bad ones are logged and ignored, so a
        mistyped update never takes a replica down (``fabric serve set-traffic`` validates before sending)."""
        weights = (user_config or {}).get("traffic")
        if not weights:
            return
        try:
            self.service.split.update(weights)
        except UsageError as e:
            log.warning("ignored traffic update %s: %s", weights, e)
            return
        log.info("traffic now %s", self.service.split.weights)

    def check_health(self) -> None:
        for v in self.service.versions.values():
            v.loaded.engine.check_health()

    def __del__(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop()
        service = getattr(self, "service", None)
        close = getattr(getattr(service, "monitor", None), "close", None)
        if close is not None:
            close()  # hand the monitor the rows gathered so far
        for v in service.versions.values() if service is not None else ():
            v.predictor.shutdown()
            v.loaded.engine.shutdown()


def build_app(args: Any = None) -> Application:
    """The Serve application for a pipeline config.

    Args:
        args: a PipelineConfig, or a mapping with ``config`` (a pipeline YAML path), ``overrides``
            (``["serve.model_uri=models:/m@champion", ...]``) and/or inline sections (``serve: {...}``).

    Raises:
        ConfigError: the config is invalid.
        UsageError: a version's model cannot be found (checked here, before any replica starts).
    """
    from fabric.serve.engines import locate

    cfg = config_from_args(args)
    for version in serving_versions(cfg):
        locate(version, cfg)  # fail at deploy time with a readable error, not in every replica
    return TabularModel.options(**deployment_options(cfg)).bind(replica_config(cfg))
