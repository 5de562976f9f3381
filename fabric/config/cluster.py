"""Config of where work runs: a local head started by ``fabric up`` or a cluster address."""

from __future__ import annotations

from pydantic import Field

from fabric.config._base import Section


class ClusterConfig(Section):
    """Ray cluster connection and the resources a local head declares."""

    address: str | None = None
    """``auto``, ``ray://host:10001`` or a GCS ``host:port``; None starts an in-process local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    object_store_memory: int | None = Field(default=None, ge=78_643_200)
    """Bytes; Ray's minimum is 75 MiB."""
