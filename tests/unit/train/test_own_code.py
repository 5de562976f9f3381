"""The training stage's handling of the user's own module and loop that needs no Ray: the loop config, a
search's dotted keys, the run key, the early check, and the artifact carrying the module."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from fabric.config import PipelineConfig
from fabric.errors import ConfigError
from fabric.models import build_from_spec, load_model
from fabric.train import check_code, loop_config
from fabric.train._checkpoint import load_ddp, save_ddp, to_artifact
from fabric.train._loop import spec_from_config, with_trial_params
from fabric.train._trainer import train_key
from tests.unit.train.synthetic import write_synthetic

MODULE = """
from torch import nn

def build(input_dim, output_dim, width=8):
    return nn.Sequential(nn.Linear(input_dim, width), nn.Tanh(), nn.Linear(width, output_dim))

def loop(config):
    pass
"""


@pytest.fixture
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module (fresh name) in the working dir, and ingested data (4 features, 2 classes) under it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"own_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    write_synthetic(tmp_path / "runs")
    return name


def _cfg(tmp_path: Path, **train: object) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "run_dir": str(tmp_path / "runs"), "train": train})


def test_the_loop_config_carries_the_own_module_and_its_folder(own: str, tmp_path: Path) -> None:
    config = loop_config(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 5}, loop=f"{own}:loop"))
    assert config["model"] == f"{own}:build" and config["model_args"] == {"width": 5}
    assert config["loop"] == f"{own}:loop" and config["code_dirs"] == [str(tmp_path.resolve())]
    assert config["task"] == "classification" and config["epochs"] == 5 and config["lr"] == 1e-3
    spec = spec_from_config(config)
    assert spec["builder"] == f"{own}:build"
    assert spec["kwargs"] == {"input_dim": 4, "output_dim": 2, "width": 5}
    assert build_from_spec(spec)(torch.zeros(3, 4)).shape == (3, 2)


def test_a_trials_dotted_keys_reach_the_model_args(own: str, tmp_path: Path) -> None:
    base = loop_config(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 5}))
    trial = with_trial_params({**base, "model_args.width": 11, "lr": 0.02})
    assert trial["model_args"] == {"width": 11} and trial["lr"] == 0.02 and "model_args.width" not in trial
    assert base["model_args"] == {"width": 5}  # the base config is not changed
    assert spec_from_config(trial)["kwargs"]["width"] == 11


def test_the_run_key_follows_the_model_its_args_the_loop_and_the_code(own: str, tmp_path: Path) -> None:
    mlp = train_key(_cfg(tmp_path))
    own_key = train_key(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 5}))
    assert own_key == train_key(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 5}))
    others = {
        train_key(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 6})),
        train_key(_cfg(tmp_path, loop=f"{own}:loop")),
        mlp,
    }
    assert own_key not in others and len(others) == 3
    (tmp_path / f"{own}.py").write_text((tmp_path / f"{own}.py").read_text() + "\n# edited\n")
    assert train_key(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 5})) != own_key


def test_a_wrong_builder_or_loop_fails_before_any_work(own: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.model: .* cannot be called with .*depth=…"):
        check_code(_cfg(tmp_path, model=f"{own}:build", model_args={"depth": 3}))
    with pytest.raises(ConfigError, match=r"train\.loop: module 'nope_\w+' .* not found"):
        check_code(_cfg(tmp_path, loop=f"nope_{own}:loop"))
    assert check_code(_cfg(tmp_path)) == []  # fabric's MLP and loop: nothing to check
    space = {"model_args.width": {"type": "choice", "values": [2, 3]}}
    searched = PipelineConfig.model_validate({"run_dir": str(tmp_path / "runs"), "tune": {"search_space": space}})
    with pytest.raises(ConfigError, match=r"tune\.search_space: model_args\.width vary an own train\.model's"):
        check_code(searched)


def test_an_own_loop_runs_ddp_only_and_model_args_need_an_own_model() -> None:
    from fabric.config import load_config

    with pytest.raises(ConfigError, match="an own train.loop runs with strategy ddp"):
        load_config(None, ["train.loop=a.b:c", "train.strategy=deepspeed"])
    with pytest.raises(ConfigError, match="model_args are the arguments of an own train.model"):
        load_config(None, ["train.model_args={width: 3}"])


def test_the_artifact_of_an_own_module_carries_its_code(own: str, tmp_path: Path) -> None:
    spec = spec_from_config(loop_config(_cfg(tmp_path, model=f"{own}:build", model_args={"width": 3})))
    model = build_from_spec(spec)
    checkpoint = tmp_path / "ckpt"
    save_ddp(checkpoint, model, None, 4, spec)  # an own loop may report without an optimizer
    assert load_ddp(checkpoint, build_from_spec(spec)) == 4
    out = to_artifact(checkpoint, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["code", "model.json", "model.pt"]
    assert (out / "code" / f"{own}.py").is_file()
    loaded, meta = load_model(out)
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta["builder"] == f"{own}:build"


@pytest.mark.parametrize(
    ("config", "dims"),
    [("own_module/own_module.yaml", (13, 3)), ("own_module/own_module_smoke.yaml", (13, 3)),
     ("own_loop/own_loop.yaml", (10, 1)), ("own_loop/own_loop_smoke.yaml", (10, 1))],
)  # fmt: skip
def test_the_shipped_examples_code_resolves_from_their_folder(
    config: str, dims: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabric.config import load_config
    from fabric.models import check_loop, check_model

    path = Path(__file__).resolve().parents[3] / "jobs" / "examples" / config
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    t = load_config(path).train
    assert t.model != "mlp" or t.loop
    if t.model != "mlp":
        check_model(t.model, t.model_args, [f"x{i}" for i in range(dims[0])], [], dims[1])
    if t.loop:
        check_loop(t.loop)
