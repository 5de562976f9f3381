"""Config of the serving stage (Ray Serve)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fabric.config._base import Section


class ServeConfig(Section):
    """How models are served over HTTP."""

    enabled: bool = False
    """Start Serve at the end of the pipeline (the process then keeps the app up)."""
    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 exposes the endpoint to the network."""
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = "fabric"
    route_prefix: str = "/"
    engine: Literal["onnx", "torch"] = "onnx"
    model_uri: str | None = None
    """``models:/name@alias`` or a local model path; None serves the pipeline's champion."""
    num_replicas: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
