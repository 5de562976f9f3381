"""fabric's serving config as vLLM's own command line, checked by vLLM's own parser (no engine started)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fabric.config import load_config
from fabric.errors import ConfigError
from fabric.serve.llm.app import deployment_options
from tests.unit.serve_llm.conftest import serve_cfg

vllm_missing = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@vllm_missing
def test_fabric_fields_map_onto_vllms_arguments(tiny_run: Path) -> None:
    from fabric.serve.llm.vllm_engine import parse_args, vllm_argv

    cfg = serve_cfg(tiny_run, max_model_len=64, kv_cache_gb=0.5, vllm={"enforce_eager": True, "seed": 3})
    args = parse_args(vllm_argv(cfg, "tiny"))
    assert args.model == str(tiny_run / "llm" / "base") and args.served_model_name == ["tiny"]
    assert args.max_model_len == 64 and args.kv_cache_memory_bytes == 1 << 29
    assert args.enforce_eager is True and args.seed == 3 and args.enable_tokenizer_info_endpoint is True
    # each adapter is a LoRA module named as fabric's clients name it: <model>:<adapter>
    assert args.enable_lora is True
    assert {m.name: m.path for m in args.lora_modules} == {
        "tiny:a": str(tiny_run / "llm" / "adapter"),
        "tiny:b": str(tiny_run / "llm" / "adapter2"),
    }
    assert args.chat_template is None  # the folder's tokenizer has one


@vllm_missing
def test_a_folder_without_a_chat_template_gets_fabrics(tmp_path: Path, tiny_run: Path) -> None:
    import shutil

    from fabric.serve.llm.vllm_engine import parse_args, vllm_argv

    folder = tmp_path / "m"
    shutil.copytree(tiny_run / "llm" / "base", folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from fabric.config.llm_serve import LLMServeConfig

    args = parse_args(vllm_argv(LLMServeConfig(model_path=str(folder)), "m"))
    assert "<|assistant|>" in args.chat_template and not args.enable_lora


@vllm_missing
def test_unknown_or_bad_vllm_arguments_name_the_config_field(tiny_run: Path) -> None:
    from fabric.serve.llm.vllm_engine import parse_args, vllm_argv

    with pytest.raises(ConfigError, match=r"llm\.serve\.vllm.*no_such_flag|llm\.serve\.vllm.*no-such-flag"):
        parse_args(vllm_argv(serve_cfg(tiny_run, vllm={"no_such_flag": 1}), "tiny"))
    with pytest.raises(ConfigError, match=r"llm\.serve\.vllm.*tool-call-parser"):
        parse_args(vllm_argv(serve_cfg(tiny_run, vllm={"enable_auto_tool_choice": True}), "tiny"))


def test_autoscaling_replaces_num_replicas_and_targets_a_batch() -> None:
    cfg = load_config(None, ["llm.serve.autoscaling={min_replicas: 1, max_replicas: 3}", "llm.serve.max_batch_size=8"])
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 8.0
    assert deployment_options(load_config(None, ["llm.serve.num_replicas=2"]))["num_replicas"] == 2


def test_adapters_vllm_cannot_load_are_refused_before_it_starts(tiny_run: Path) -> None:
    from fabric.errors import UsageError
    from fabric.serve.llm.vllm_engine import check_adapters

    check_adapters(serve_cfg(tiny_run))  # plain LoRA adapters
    cfg = serve_cfg(tiny_run).model_copy(update={"adapters": {"c": str(tiny_run / "llm" / "adapter3")}})  # saves ln_f
    with pytest.raises(UsageError, match=r"llm\.serve\.adapters\.c: vLLM cannot serve .*modules \(ln_f\).*merged"):
        check_adapters(cfg)


def test_an_exclusive_holder_runs_alone_and_goes_before_later_shared_ones() -> None:
    import asyncio

    from fabric.serve.llm.vllm_engine import _SharedOrExclusive

    async def scenario() -> list[str]:
        lock, log = _SharedOrExclusive(), []

        async def user(name: str, exclusive: bool, delay: float) -> None:
            await asyncio.sleep(delay)
            async with lock.hold(exclusive):
                log.append(f"+{name}")
                await asyncio.sleep(0.05)
                log.append(f"-{name}")

        await asyncio.gather(user("a", False, 0), user("b", False, 0), user("X", True, 0.01), user("c", False, 0.02))
        return log

    log = asyncio.run(scenario())
    x = log.index("+X")
    assert log[x + 1] == "-X"  # nothing ran beside X
    assert x > max(log.index("-a"), log.index("-b"))  # X waited for the shared holders already in
    assert log.index("+c") > log.index("-X")  # and c, which came while X waited, went after it
