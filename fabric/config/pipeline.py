"""The whole lifecycle in one config: a section per stage."""

from __future__ import annotations

from pydantic import Field

from fabric.config._base import Section
from fabric.config.cluster import ClusterConfig
from fabric.config.data import DataConfig
from fabric.config.export import ExportConfig
from fabric.config.llm import LLMConfig
from fabric.config.monitor import MonitorConfig
from fabric.config.predict import PredictConfig
from fabric.config.serve import ServeConfig
from fabric.config.track import TrackConfig
from fabric.config.train import TrainConfig
from fabric.config.tune import TuneConfig


class PipelineConfig(Section):
    """Every stage's settings; the defaults run on a laptop CPU."""

    name: str = "fabric"
    run_dir: str = "runs"
    """Where stages write their outputs (relative paths resolve against the working directory)."""
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
