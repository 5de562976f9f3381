"""The whole lifecycle from one PipelineConfig: each stage's public `run(cfg)`, in order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fabric.config import PipelineConfig
from fabric.runtime import connect


@dataclass
class PipelineResult:
    """What each stage returned, by stage name, and how long each took."""

    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: PipelineConfig) -> PipelineResult:
    """Run every stage that the config enables, in lifecycle order, on the current Ray."""
    from fabric import data

    connect(cfg.cluster)
    result = PipelineResult()
    stages = [("ingest", data.run)]
    for name, stage in stages:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        result.stages[name] = stage(cfg)
        result.seconds[name] = time.perf_counter() - start
    summary = ", ".join(f"{n} {s:.1f}s" for n, s in result.seconds.items())
    print(f"== pipeline {cfg.name} done: {summary}", flush=True)
    return result
