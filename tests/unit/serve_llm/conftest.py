"""A tiny model folder (built once per session) and a started CPU engine per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.config.llm_serve import LLMServeConfig
from fabric.serve.llm.transformers_engine import TransformersEngine
from tests.llm_fixtures import tiny_llm


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run_dir with ``llm/base``, ``llm/adapter``, ``llm/adapter2`` and ``llm/reference.parquet``."""
    return tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def serve_cfg(run: Path, **kw: object) -> LLMServeConfig:
    """The serving config of the tiny model with adapters ``a`` and ``b``."""
    llm = run / "llm"
    adapters = {"a": str(llm / "adapter"), "b": str(llm / "adapter2")}
    return LLMServeConfig(model_path=str(llm / "base"), adapters=adapters, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_run: Path) -> Iterator[TransformersEngine]:
    """A started engine (one adapter loaded at a time, a short batching wait)."""
    e = TransformersEngine(serve_cfg(tiny_run, max_loaded_adapters=1, batch_wait_s=0.05, max_batch_size=8), "tiny")
    e.start()
    yield e
    e.shutdown()
