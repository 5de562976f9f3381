"""The user's own model builder and loop by import path: the resolver's errors, and the artifact that
carries the user's module so that it loads anywhere (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from fabric.errors import ConfigError
from fabric.models import bundle_code, check_loop, check_model, code_digest, load_model, model_spec, save_model
from fabric.models._artifact import build_from_spec

GOOD = """
from torch import nn

def build(input_dim, output_dim, width=8):
    return nn.Sequential(nn.Linear(input_dim, width), nn.ReLU(), nn.Linear(width, output_dim))

def loop(config):
    pass
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Write a module (a fresh name each time: imports are cached) into a working dir and cd there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def write(source: str = GOOD) -> str:
        name = f"user_{uuid.uuid4().hex[:8]}"
        (work / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_a_good_builder_is_built_and_checked_from_the_working_dir(user_module) -> None:  # type: ignore[no-untyped-def]
    name = user_module()
    model = check_model(f"{name}:build", {"width": 5}, ["a", "b", "c"], [], output_dim=2)
    assert model(torch.zeros(4, 3)).shape == (4, 2) and model[0].out_features == 5
    assert callable(check_loop(f"{name}:loop"))


@pytest.mark.parametrize(
    ("source", "path", "args", "message"),
    [
        (GOOD, "nowhere_{u}:build", {}, r"train\.model: module 'nowhere_\w+' of .* not found in the working dir"),
        ("import not_installed_pkg_x\n", "{m}:build", {}, r"importing '\w+' .* failed: ModuleNotFoundError"),
        ("raise RuntimeError('boom')\n", "{m}:build", {}, r"importing .* failed: RuntimeError: boom"),
        (GOOD, "{m}:missing", {}, r"has no attribute 'missing'"),
        ("build = 3\n", "{m}:build", {}, r"is a int, not a function"),
        (GOOD, "{m}:build", {"depth": 2}, r"cannot be called with \(input_dim=…, output_dim=…, depth=…\)"),
        (
            "def build(input_dim, output_dim):\n    return 42\n",
            "{m}:build",
            {},
            r"returned a int, not a torch\.nn\.Module",
        ),
        (
            "from torch import nn\ndef build(input_dim, output_dim):\n    return nn.Linear(input_dim, 7)\n",
            "{m}:build",
            {},
            r"maps a \[2, 3\] batch to \[2, 7\]; it must give \[rows, output_dim\] = \[2, 2\]",
        ),
        (
            "def build(input_dim, output_dim):\n    raise ValueError('width too small')\n",
            "{m}:build",
            {},
            r"raised ValueError: width too small",
        ),
    ],
    ids=["not-found", "import-inside", "raises-on-import", "no-attr", "not-callable", "signature", "not-module",
         "output-shape", "builder-raises"],
)
def test_each_bad_builder_is_one_config_error_naming_the_field(  # type: ignore[no-untyped-def]
    user_module, source: str, path: str, args: dict, message: str
) -> None:
    name = user_module(source)
    with pytest.raises(ConfigError, match=message) as info:
        check_model(path.format(m=name, u=uuid.uuid4().hex[:6]), args, ["a", "b", "c"], [], output_dim=2)
    assert [p.path for p in info.value.problems] == ["train.model"]


def test_a_loop_must_take_the_config(user_module) -> None:  # type: ignore[no-untyped-def]
    name = user_module("def loop():\n    pass\n")
    with pytest.raises(ConfigError, match=r"train\.loop: .* cannot be called with \(config\)"):
        check_loop(f"{name}:loop")


def test_the_artifact_carries_the_module_and_loads_in_another_directory(  # type: ignore[no-untyped-def]
    user_module, tmp_path: Path
) -> None:
    name = user_module()
    path = f"{name}:build"
    kwargs = {"input_dim": 3, "output_dim": 2, "width": 6}
    spec = model_spec(path, kwargs, task="classification", feature_names=["a", "b", "c"], num_classes=2)
    torch.manual_seed(0)
    model = build_from_spec(spec)
    folder = save_model(tmp_path / "model", model, spec)
    assert bundle_code(path, folder) == folder / "code"
    assert sorted(p.name for p in (folder / "code").iterdir()) == [f"{name}.py"]
    loaded, meta = load_model(folder)
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert json.loads((folder / "model.json").read_text())["builder"] == path and meta["kwargs"] == kwargs
    # A fresh process elsewhere, without the working dir: the folder's code/ is enough.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys, torch; from fabric.models import load_model; m, _ = load_model(sys.argv[1]); "
        "print(m(torch.ones(1, 3)).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder)], cwd=elsewhere, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)[0] == pytest.approx(loaded(torch.ones(1, 3))[0].tolist())


def test_installed_code_is_not_copied_and_an_edit_changes_the_digest(  # type: ignore[no-untyped-def]
    user_module, tmp_path: Path
) -> None:
    assert bundle_code("torch.nn:Linear", tmp_path) is None and code_digest("torch.nn:Linear") == ""
    name = user_module()
    before = code_digest(f"{name}:build")
    Path(f"{name}.py").write_text(Path(f"{name}.py").read_text() + "\n# edited\n")
    assert code_digest(f"{name}:build") not in ("", before)
