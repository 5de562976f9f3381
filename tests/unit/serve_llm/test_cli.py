"""`fabric serve-llm` without Ray: the Serve config it prints, and readable refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from fabric.cli import serve_llm
from fabric.errors import ConfigError, UsageError


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve_llm.add_arguments(p)
    return p.parse_args(list(argv))


def test_print_config_is_a_portable_serve_run_file(project_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(project_root / "jobs" / "configs" / "llm_serve_smoke.yaml")
    assert serve_llm.run(_args(config, "llm.serve.port=8011", "--print-config")) == 0
    out = capsys.readouterr().out
    assert out.startswith("# serve run <this file>")
    doc = yaml.safe_load(out)
    app = doc["applications"][0]
    assert app["import_path"] == "fabric.serve.llm.app:build_openai_app"
    assert app["args"] == {"config": config, "overrides": ["llm.serve.port=8011"]}
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8011}


def test_bad_values_and_missing_models_are_refused_before_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="llm.serve.max_batch_size"):
        serve_llm.run(_args("llm.serve.max_batch_size=0"))
    with pytest.raises(UsageError, match="no Hugging Face model folder"):
        serve_llm.run(_args(f"run_dir={tmp_path}", "cluster.address=127.0.0.1:1", "--detach"))
