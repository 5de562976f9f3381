"""Config loading, overrides and error collection (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabric.config import PipelineConfig, dump_config, load_config, parse_overrides
from fabric.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
# jobs/configs and the examples users copy (jobs/examples/<example>/*.yaml)
SHIPPED = sorted([*(ROOT / "jobs" / "configs").glob("*.yaml"), *(ROOT / "jobs" / "examples").rglob("*.yaml")])


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_are_valid_and_laptop_sized() -> None:
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.train.num_workers <= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "jobs")))
def test_every_shipped_config_validates_and_says_how_to_run_it(path: Path) -> None:
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("python jobs/" in first or "fabric " in first), first


def test_shipped_configs_include_a_smoke_config() -> None:
    assert any(p.name.endswith("_smoke.yaml") for p in SHIPPED)


def test_overrides_apply_on_top_of_file(tmp_path: Path) -> None:
    p = _write(tmp_path, {"train": {"epochs": 3, "lr": 0.01}})
    cfg = load_config(p, ["train.epochs=7", "tune.search_space.lr.low=0.001", "data.categorical=[a, b]"])
    assert cfg.train.epochs == 7
    assert cfg.train.lr == 0.01  # untouched by the override
    assert cfg.tune.search_space["lr"].low == 0.001
    assert cfg.tune.search_space["lr"].high == PipelineConfig().tune.search_space["lr"].high
    assert cfg.data.categorical == ["a", "b"]


def test_override_values_are_typed() -> None:
    nested, problems = parse_overrides(["a.b=4", "a.c=0.5", "a.d=true", "a.e=null", "a.f=text"])
    assert not problems
    assert nested == {"a": {"b": 4, "c": 0.5, "d": True, "e": None, "f": "text"}}


def test_all_problems_reported_at_once_with_field_paths(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        {
            "train": {"num_workers": 0, "strategy": "horovod", "epochz": 3},
            "data": {"source": "missing/file.csv", "split": {"train": 0.9, "val": 0.2, "test": 0.1}},
            "tune": {"search_space": {"lr": {"type": "loguniform", "low": 0.1, "high": 0.01}}},
            "serve": {"port": "eighty"},
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(p, ["not-an-override", "monitor.window_size=1"])
    paths = {pr.path for pr in info.value.problems}
    assert {
        "not-an-override",
        "train.num_workers",
        "train.strategy",
        "train.epochz",
        "data.source",
        "data.split",
        "tune.search_space.lr",
        "serve.port",
        "monitor.window_size",
    } <= paths
    text = str(info.value)
    assert "unknown key; allowed keys:" in text and "epochs" in text  # says what is allowed
    assert "'ddp' or 'deepspeed'" in text
    assert "file not found" in text
    assert "must be 1.0" in text


def test_unknown_section_names_allowed_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, {"trian": {"epochs": 1}}))
    (problem,) = info.value.problems
    assert problem.path == "trian"
    assert "train" in problem.message and "data" in problem.message


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(_write(tmp_path, "train:\n  epochs: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=2", "serve.port=9000"])
    p = _write(tmp_path, dump_config(cfg))
    assert load_config(p) == cfg


def test_config_error_pickles_with_its_problems() -> None:
    import pickle

    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epochs=0"])
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems
    assert str(copy) == str(info.value)


def test_an_override_replaces_the_value_it_names() -> None:
    shipped = load_config(ROOT / "jobs" / "configs" / "llm_serve_smoke.yaml")
    assert shipped.llm.serve.adapters  # the config lists an adapter...
    emptied = load_config(ROOT / "jobs" / "configs" / "llm_serve_smoke.yaml", ["llm.serve.adapters={}"])
    assert emptied.llm.serve.adapters == {}  # ...and `key={}` empties the mapping
    cfg = load_config(None, ["tune.search_space={lr: {type: loguniform, low: 0.001, high: 0.1}}"])
    assert list(cfg.tune.search_space) == ["lr"]  # a mapping value replaces, it does not merge
