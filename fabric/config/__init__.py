"""Typed, validated configs: one section per stage and a PipelineConfig holding them all."""

from fabric.config._load import deep_merge, dump_config, load_config, parse_overrides, validate
from fabric.config.cluster import ClusterConfig
from fabric.config.data import DataConfig, Expectations, Range, Split
from fabric.config.export import ExportConfig
from fabric.config.llm import FinetuneConfig, LLMConfig, LMDataConfig, LMModelConfig, LoRAConfig
from fabric.config.llm_eval import LLMEvalConfig, LLMGenerateConfig
from fabric.config.llm_serve import LLMServeConfig
from fabric.config.monitor import MonitorConfig
from fabric.config.predict import PredictConfig
from fabric.config.pipeline import PipelineConfig
from fabric.config.serve import ServeConfig
from fabric.config.track import PromotionConfig, TrackConfig, WandbConfig
from fabric.config.train import DeepSpeedConfig, TrainConfig, WorkerGroupConfig, with_params
from fabric.config.tune import Param, Scheduler, TuneConfig

__all__ = [
    "ClusterConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "Expectations",
    "ExportConfig",
    "FinetuneConfig",
    "LLMConfig",
    "LLMEvalConfig",
    "LLMGenerateConfig",
    "LLMServeConfig",
    "LMDataConfig",
    "LMModelConfig",
    "LoRAConfig",
    "MonitorConfig",
    "Param",
    "PipelineConfig",
    "PredictConfig",
    "PromotionConfig",
    "Range",
    "Scheduler",
    "ServeConfig",
    "Split",
    "TrackConfig",
    "TrainConfig",
    "TuneConfig",
    "WandbConfig",
    "WorkerGroupConfig",
    "deep_merge",
    "dump_config",
    "load_config",
    "parse_overrides",
    "validate",
    "with_params",
]
