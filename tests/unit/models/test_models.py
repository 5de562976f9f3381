"""Model builders and the self-contained artifact (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fabric.errors import FabricError
from fabric.models import build_mlp, load_model, model_spec, save_model


@pytest.mark.parametrize(("output_dim", "num_layers"), [(3, 1), (1, 3)])
def test_mlp_shapes_and_depth(output_dim: int, num_layers: int) -> None:
    model = build_mlp(input_dim=5, output_dim=output_dim, hidden_size=8, num_layers=num_layers, dropout=0.2)
    assert model(torch.randn(7, 5)).shape == (7, output_dim)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == num_layers + 1


def test_mlp_rejects_bad_sizes_naming_them() -> None:
    with pytest.raises(ValueError, match=r"hidden_size=0.*dropout=1.0"):
        build_mlp(input_dim=4, output_dim=2, hidden_size=0, num_layers=1, dropout=1.0)


def _spec() -> dict:
    kwargs = {"input_dim": 3, "output_dim": 2, "hidden_size": 4, "num_layers": 2, "dropout": 0.1}
    return model_spec("mlp", kwargs, task="classification", feature_names=["a", "b", "c"], num_classes=2)


def test_save_then_load_gives_the_same_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = _spec()
    model = build_mlp(**spec["kwargs"]).eval()
    folder = save_model(tmp_path / "model", model, spec)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]
    loaded, meta = load_model(folder)
    x = torch.randn(6, 3)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["task"] == "classification" and meta["feature_names"] == ["a", "b", "c"] and meta["num_classes"] == 2
    assert meta["builder"] == "mlp" and meta["kwargs"] == spec["kwargs"]


def test_load_model_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FabricError, match="no model.json"):
        load_model(tmp_path)
    spec = _spec()
    save_model(tmp_path, build_mlp(**spec["kwargs"]), spec)
    # weights of another architecture
    wider = {**spec, "kwargs": {**spec["kwargs"], "hidden_size": 9}}
    (tmp_path / "model.json").write_text(json.dumps(wider))
    with pytest.raises(FabricError, match="does not match the architecture"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**spec, "builder": "nope"}))
    with pytest.raises(FabricError, match="builder 'nope'"):
        load_model(tmp_path)
    with pytest.raises(FabricError, match="unknown model builder"):
        model_spec("nope", {})
