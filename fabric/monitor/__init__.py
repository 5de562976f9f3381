"""Drift monitoring of the serving stream: statistics, a plain DriftMonitor, its Ray actor and a client.

Serving replicas feed it through ``MonitorClient(cfg.monitor).submit(rows, predictions)`` and read it
through ``MonitorClient.drift_json()`` / ``report_html()``; ``run(cfg)`` starts it over ingestion's reference.
Node resources come from Ray's own ``ray_node_*`` metrics (``read_nodes``). Importing this package loads
neither Ray nor Evidently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fabric import storage
from fabric.monitor.actor import MonitorActor, get_actor, start
from fabric.monitor.client import MonitorClient, MonitorUnavailableError
from fabric.monitor.monitor import DriftMonitor, load_reference, reference_spec
from fabric.monitor.resources import NodeReading, read_nodes

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from fabric.config import PipelineConfig

__all__ = [
    "DriftMonitor",
    "MonitorActor",
    "MonitorClient",
    "MonitorUnavailableError",
    "NodeReading",
    "checkpoint_path",
    "get_actor",
    "load_reference",
    "read_nodes",
    "reference_spec",
    "run",
    "start",
    "stop",
]


def checkpoint_path(cfg: PipelineConfig) -> str:
    """Where the monitor checkpoints: ``cfg.monitor.checkpoint_path`` or ``<run_dir>/monitor/state.pkl``."""
    return cfg.monitor.checkpoint_path or storage.join(cfg.run_dir, "monitor", "state.pkl")


def run(cfg: PipelineConfig) -> ActorHandle:
    """Start (or get) the named drift-monitor actor over ``<run_dir>/data/reference.parquet``.

    Connects to Ray (``cfg.cluster``), reads ingestion's reference sample and meta.json, starts the actor in
    namespace ``fabric`` under ``cfg.monitor.actor_name`` (restartable, checkpointed to ``checkpoint_path``).
    Node resources need nothing started: Ray's agents export them (:func:`read_nodes`).

    Returns:
        The actor's handle. With ``monitor.detached=false`` keep it: the actor ends when its last handle
        goes (and ``/monitor/drift`` then answers 503).
    """
    from fabric.runtime import connect

    connect(cfg.cluster)
    reference, meta = load_reference(cfg.run_dir)
    return start(
        cfg.monitor,
        reference,
        **reference_spec(cfg, reference, meta),
        checkpoint_path=checkpoint_path(cfg),
        run_dir=cfg.run_dir,
    )


def stop(cfg: PipelineConfig) -> bool:
    """Stop the monitor actor (for good); False when no monitor was running."""
    from fabric.monitor.actor import stop as stop_actor
    from fabric.runtime import connect

    connect(cfg.cluster)
    return stop_actor(cfg.monitor.actor_name)
