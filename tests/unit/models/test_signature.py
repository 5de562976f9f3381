"""Input signatures of own modules: what the adapter cuts out of the feature matrix, its ONNX export, the
artifact that rebuilds it elsewhere, and one clear error per malformed signature (no Ray)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fabric.errors import ConfigError
from fabric.models import adapt, check_model, column_layout, load_model, model_spec, save_model
from fabric.models._artifact import build_from_spec

# 8 steps of a series, a numeric column, and a categorical column with three training categories.
FEATURES = [*(f"x_{i}" for i in range(8)), "age", "city=Oslo", "city=Paris", "city=Rome"]
CATEGORICAL = ["city"]


class SeriesNet(nn.Module):
    """A 1-D CNN over the series and an embedding over the city's id."""

    input_signature = {
        "series": {"columns": "x_*", "shape": [1, -1]},
        "city": {"columns": ["city"], "as": "ids"},
        "age": {"columns": ["age"]},
    }

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, kernel_size=3, padding=1)
        self.embed = nn.Embedding(4, 2)
        self.out = nn.Linear(3 * 8 + 2 + 1, 2)

    def forward(self, series: torch.Tensor, city: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.conv(series).flatten(1), self.embed(city[:, 0]), age], dim=1))


def _batch() -> torch.Tensor:
    x = torch.randn(4, len(FEATURES))
    x[:, 9:] = 0.0
    x[0, 10] = 1.0  # Paris
    x[1, 11] = 1.0  # Rome
    x[2, 9] = 1.0  # Oslo; row 3: a city training never saw (all zeros)
    return x


def test_the_layout_reads_columns_and_categories_from_the_feature_names() -> None:
    assert column_layout(FEATURES, CATEGORICAL) == {
        **{f"x_{i}": None for i in range(8)}, "age": None, "city": ["Oslo", "Paris", "Rome"]
    }  # fmt: skip


def test_the_adapter_cuts_ids_values_and_shapes_out_of_the_features() -> None:
    model = adapt(SeriesNet(), FEATURES, CATEGORICAL)
    x = _batch()
    inputs = model.inputs(x)
    assert inputs["city"].dtype == torch.int64 and inputs["city"][:, 0].tolist() == [2, 3, 1, 0]
    assert inputs["series"].shape == (4, 1, 8) and torch.equal(inputs["series"][:, 0], x[:, :8])
    assert torch.equal(inputs["age"], x[:, 8:9])
    assert model(x).shape == (4, 2)
    # Only the user's weights are saved; the index tables are rebuilt from the signature.
    assert sorted(model.state_dict()) == sorted(f"net.{k}" for k in SeriesNet().state_dict())


def test_a_module_without_a_signature_is_left_as_it_is() -> None:
    net = nn.Linear(len(FEATURES), 2)
    assert adapt(net, FEATURES, CATEGORICAL) is net


def test_the_onnx_export_takes_features_and_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    from fabric.export._onnx import export_onnx

    torch.manual_seed(0)
    model = adapt(SeriesNet(), FEATURES, CATEGORICAL).eval()
    path = export_onnx(model, len(FEATURES), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    x = _batch()
    onnx_out = session.run(None, {"features": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-5)


def _bad(signature: Any) -> nn.Module:
    class Net(nn.Module):
        input_signature = signature

        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
            return torch.cat(list(inputs.values()), dim=1)

    return Net()


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ({"series": {"columns": ["x_0", "height"]}}, r"names column\(s\) 'height' the data does not have"),
        ({"series": {"columns": "y_*"}}, r"pattern 'y_\*' matches no input column"),
        ({"city": {"columns": ["age"], "as": "ids"}}, r"asks ids of numeric column\(s\) 'age'"),
        ({"series": {"columns": "x_*", "shape": [3, -1]}}, r"8 features do not fit shape \[3, -1\]"),
        ({"series": {"columns": "x_*", "as": "onehot"}}, r"'as'\] must be 'values' or 'ids'"),
        ({"series": {"cols": "x_*"}}, r"unknown key\(s\) cols"),
        ({"series": {"columns": []}}, r"must be a non-empty list of column names or a glob pattern"),
    ],
    ids=["unknown-column", "empty-pattern", "ids-of-numeric", "shape", "as", "key", "no-columns"],
)
def test_a_bad_signature_is_one_config_error_naming_train_model(signature: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        adapt(_bad(signature), FEATURES, CATEGORICAL)
    assert [p.path for p in info.value.problems] == ["train.model"]


def test_a_signature_that_forward_does_not_take_is_named() -> None:
    class Net(SeriesNet):
        input_signature = {**SeriesNet.input_signature, "height": {"columns": ["age"]}}

    with pytest.raises(ConfigError, match=r"declares series, city, age, height but Net.forward does not take them"):
        adapt(Net(), FEATURES, CATEGORICAL)


BUILDER = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, columns, output_dim):
        super().__init__()
        # the numeric columns in the data's order: not alphabetical (model.json's keys are)
        self.numeric = [c for c, cats in columns.items() if cats is None]
        self.input_signature = {"ids": {"columns": ["city"], "as": "ids"}, "numeric": {"columns": self.numeric}}
        self.embed = nn.Embedding(len(columns["city"]) + 1, 2)
        self.out = nn.Linear(2 + len(self.numeric), output_dim)

    def forward(self, ids, numeric):
        return self.out(torch.cat([self.embed(ids[:, 0]), numeric], dim=1))

def build(input_dim, output_dim, columns):
    return Net(columns, output_dim)
"""


def test_an_own_builder_gets_the_columns_and_its_artifact_rebuilds_it_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabric.models import bundle_code

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"user_{uuid.uuid4().hex[:8]}"
    (work / f"{name}.py").write_text(textwrap.dedent(BUILDER))
    features = ["zeta", "alpha", "city=Oslo", "city=Rome", "mid"]
    model = check_model(f"{name}:build", {}, features, CATEGORICAL, output_dim=2)
    assert model.net.numeric == ["zeta", "alpha", "mid"]
    spec = model_spec(f"{name}:build", {"input_dim": 5, "output_dim": 2}, task="classification",
                      feature_names=features, categorical=CATEGORICAL, num_classes=2)  # fmt: skip
    torch.manual_seed(0)
    trained = build_from_spec(spec)
    folder = save_model(tmp_path / "model", trained, spec)
    bundle_code(f"{name}:build", folder)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(name, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(work)])
    loaded, _ = load_model(folder)
    x = torch.tensor([[0.5, -1.0, 0.0, 1.0, 2.0], [1.5, 0.0, 1.0, 0.0, -2.0]])
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert loaded.net.numeric == ["zeta", "alpha", "mid"]
