"""Config of the serving stage (Ray Serve): models, traffic split, batching, scaling, the fast path."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section

# A version name appears in URLs (/v2/models/{name}/versions/{version}/infer) and in CLI arguments (v1=90).
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ModelVersion(Section):
    """One model version behind the endpoint, and its share of the traffic."""

    name: str = Field(pattern=VERSION_PATTERN)
    """Version name: what responses report in ``model_version`` and what ``set-traffic`` names."""
    model_uri: str
    """``models:/name@alias``, ``models:/name/3`` or a local model folder (``model.pt`` + ``model.json``)."""
    weight: float = Field(default=1.0, ge=0)
    """Relative share of the traffic (weights need not sum to 100; 0 keeps the version loaded but idle)."""
    onnx_path: str | None = None
    """The ``.onnx`` file for the onnx engine; None: ``model.onnx`` in the model folder, else exported once."""


class Autoscaling(Section):
    """Ray Serve autoscaling of the model deployment (replaces ``num_replicas`` when set)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    """Requests per replica the autoscaler aims for; None: ``max_batch_size`` (a replica is busy, not
    overloaded, while one batch waits behind the one running)."""
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ServeConfig(Section):
    """How models are served over HTTP (Open Inference Protocol v2)."""

    enabled: bool = False
    """Start Serve at the end of the pipeline (the process then keeps the app up)."""
    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 exposes the endpoint to the network (and is needed on multi-node clusters)."""
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = Field(default="fabric", pattern=r"^[A-Za-z0-9_.-]+$")
    route_prefix: str = "/"
    model_name: str | None = None
    """The name in ``/v2/models/{name}``; None: the registry name of a ``models:/`` URI, else ``track.model_name``."""
    engine: Literal["onnx", "torch"] = "onnx"
    """``onnx``: ONNX Runtime (CUDA provider when present); ``torch``: the eager PyTorch module."""
    model_uri: str | None = None
    """``models:/name@alias`` or a local model path; None (and no ``versions``) serves the registry's champion."""
    versions: list[ModelVersion] = Field(default_factory=list)
    """Several versions behind one endpoint, split by weight (A/B, canary). Exclusive with ``model_uri``."""
    sticky_header: str | None = None
    """Route requests carrying the same value of this header (e.g. ``x-user-id``) to the same version."""
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = None
    """Scale replicas with load; None: a fixed ``num_replicas``."""
    replica_cpus: float = Field(default=1.0, ge=0)
    """CPUs Ray reserves per replica."""
    replica_gpus: float = Field(default=0.0, ge=0)
    """GPUs per replica; the onnx engine runs on CUDA when it has one."""
    threads: int = Field(default=1, ge=1)
    """Intra-op threads of each replica's engine; one suits small tabular models (add replicas instead)."""
    max_batch_size: int = Field(default=32, ge=1)
    """Most requests one ``@serve.batch`` call runs together."""
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    """Longest a batch waits to fill. The wait adapts to load: none while requests come one at a time."""
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    """Requests a replica holds at once (back-pressure); None: two batches' worth (one running, one filling)."""
    max_queued_requests: int = Field(default=-1, ge=-1)
    """Requests waiting for a replica before new ones get 503; -1: no limit."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body accepted; bigger ones get 413 before they are read."""
    impute_nulls: bool = False
    """Accept nulls in named-column input, filled as in training (a numeric column's training mean, no category),
    even in columns that held no nulls in the training data; False answers such a null with a 422 naming the row
    and the column."""
    access_log: bool = False
    """Serve's per-request access log line in the replica logs (a few percent of a cheap request's CPU)."""
    fast_path: bool = True
    """HAProxy ingress and the direct gRPC data plane (RAY_SERVE_ENABLE_HA_PROXY and
    RAY_SERVE_THROUGHPUT_OPTIMIZED for the Ray processes that fabric starts): about 14x Serve's defaults here."""

    @field_validator("sticky_header")
    @classmethod
    def _lower_header(cls, v: str | None) -> str | None:
        # HTTP header names are case-insensitive; ASGI hands them over lower-cased.
        return v.strip().lower() if v is not None else None

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.versions and self.model_uri is not None:
            raise ValueError("set either model_uri (one model) or versions (a traffic split), not both")
        names = [v.name for v in self.versions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"version names must be unique; repeated: {', '.join(dupes)}")
        if self.versions and sum(v.weight for v in self.versions) <= 0:
            raise ValueError("at least one version needs a weight above 0")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    @property
    def ongoing_limit(self) -> int:
        """``max_ongoing_requests``, sized to two batches when not set."""
        return self.max_ongoing_requests or 2 * self.max_batch_size
