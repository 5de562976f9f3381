"""The builtin datasets: read from installed packages, named in the config, light to import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fabric.config import load_config
from fabric.config.data import BUILTIN_DATASETS
from fabric.data import BUILTINS, load_builtin
from fabric.errors import ConfigError


def test_config_and_registry_agree() -> None:
    assert set(BUILTINS) == set(BUILTIN_DATASETS)


def test_default_source_is_fair_with_categoricals() -> None:
    assert load_config(None, []).data.source == "builtin:fair"
    df = load_builtin("fair")
    assert df.shape == (6366, 9)
    assert 0.25 < df["target"].mean() < 0.4  # any affair: 32% of respondents
    assert df["occupation"].nunique() == 6 and df["occupation"].map(type).eq(str).all()
    assert not df.isna().any().any()


def test_breast_cancer() -> None:
    df = load_builtin("breast_cancer")
    assert df.shape == (569, 31) and set(df["target"]) == {0, 1}


def test_unknown_builtin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="known: fair, breast_cancer"):
        load_config(None, ["data.source=builtin:iris"])


def test_importing_fabric_data_does_not_import_ray() -> None:
    # Serving replicas import load_preprocessor; they must not pay for Ray Data.
    code = "import sys, fabric.data; print('ray' in sys.modules, 'ray.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
