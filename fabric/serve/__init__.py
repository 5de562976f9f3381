"""Serving: tabular models over the Open Inference Protocol v2 on Ray Serve, with a traffic split.

Public surface:

* :func:`build_app` — ``args -> serve.Application`` (``import_path: fabric.serve.app:build_app``)
* :func:`run` — the pipeline's serve stage: deploy the app of a config and return where it answers
* :func:`deploy`, :func:`set_traffic`, :func:`status`, :func:`delete` — driving a running Serve
* ``protocol`` (wire models), ``engines`` (``Engine`` ABC: onnx, torch), ``router`` (``TrafficSplit``)

Importing this package loads neither Ray nor torch nor onnxruntime.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ray.serve import Application

    from fabric.config import PipelineConfig
    from fabric.serve.control import ServeResult

__all__ = ["build_app", "delete", "deploy", "run", "serve_forever", "set_traffic", "status"]


def build_app(args: Any = None) -> Application:
    """The Serve application for a pipeline config (see :func:`fabric.serve.app.build_app`)."""
    from fabric.serve.app import build_app as _build

    return _build(args)


def run(cfg: PipelineConfig) -> ServeResult:
    """The serve stage: deploy ``cfg``'s app on Serve (fast path) and return its URL once it answers.

    The app keeps running after this returns, for as long as the Ray cluster does (``fabric serve``
    keeps a local Ray up until interrupted).
    """
    from fabric.serve.control import deploy as _deploy

    result = _deploy(cfg)
    log.info(
        f"serve: {result.app_name} at {result.url} (model {result.model_name}, traffic {result.traffic}, "
        f"fast path {'on' if result.fast_path else 'off'})"
    )
    return result


def serve_forever(app: str = "fabric", poll_s: float = 2.0, delete_on_stop: bool = True) -> bool:
    """Block while ``app`` runs (a process that started its own Ray must stay up for the app to).

    Args:
        app: the Serve application.
        poll_s: seconds between checks that it still runs.
        delete_on_stop: on Ctrl-C or SIGTERM, delete the app (False when this process's own Ray is
            about to end anyway: deleting first would wait out each replica's draining period).

    Returns:
        True when stopped by Ctrl-C or SIGTERM, False when the app went away.
    """
    import signal
    import threading
    import time

    from fabric.serve.control import app_running
    from fabric.serve.control import delete as _delete

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        # Ray's own SIGTERM handler dumps a stack and kills the process; stop cleanly instead.
        previous = signal.signal(signal.SIGTERM, _stop)
        # A background job of a non-interactive shell starts with SIGINT ignored.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while app_running(app):
            time.sleep(poll_s)
        return False
    except KeyboardInterrupt:
        log.info(f"stopping {app}")
        if delete_on_stop:
            _delete(app)
        return True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def deploy(cfg: PipelineConfig, timeout_s: float = 300.0) -> ServeResult:
    """Deploy (or update) ``cfg``'s app and wait until it runs."""
    from fabric.serve.control import deploy as _deploy

    return _deploy(cfg, timeout_s)


def set_traffic(weights: dict[str, float], app: str = "fabric") -> dict[str, float]:
    """Change a running app's traffic split (no replica restarts); returns the new percentages."""
    from fabric.serve.control import set_traffic as _set

    return _set(weights, app)


def status(app: str | None = None) -> list[dict[str, Any]]:
    """Serve apps with their deployments' replica states and fabric apps' traffic."""
    from fabric.serve.control import status as _status

    return _status(app)


def delete(app: str = "fabric") -> None:
    """Remove an app from Serve."""
    from fabric.serve.control import delete as _delete

    _delete(app)
