"""Export tests load models with ``fabric.models.load_model``; stand in for it while that package is absent."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from tests.unit.tracking import fixtures as fx


@pytest.fixture(autouse=True, scope="session")
def _models_package() -> Iterator[None]:
    if fx.HAVE_MODELS:
        yield
        return
    stub = types.ModuleType("fabric.models")
    stub.load_model = fx.load_model  # type: ignore[attr-defined]
    stub.build_mlp = fx.build_mlp  # type: ignore[attr-defined]
    sys.modules["fabric.models"] = stub
    yield
    sys.modules.pop("fabric.models", None)
