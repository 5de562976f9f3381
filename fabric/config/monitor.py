"""Config of the drift monitor."""

from __future__ import annotations

from pydantic import Field

from fabric.config._base import Section


class MonitorConfig(Section):
    """The drift-monitor actor that reads the serving stream."""

    enabled: bool = True
    window_size: int = Field(default=500, ge=10)
    sample_rate: float = Field(default=1.0, gt=0, le=1)
    queue_size: int = Field(default=10_000, ge=1)
    interval_s: float = Field(default=60.0, gt=0)
    drift_share_threshold: float = Field(default=0.5, gt=0, le=1)
    """Share of drifted columns at which the dataset counts as drifted."""
    webhook_url: str | None = None
