"""The language-model stages with run_dir on object storage: a real S3 API (moto's server on 127.0.0.1) reached the
standard way, on a real local Ray whose workers inherit the AWS variables.

One fine-tune of a tiny Llama for the module: its worker reads the base from the bucket and uploads its checkpoints
there, and the outputs are published there. Then, each time with the driver's local copy gone (another machine): a
rerun finds the run done in the bucket, the transformers engine serves it from the bucket, and ``fabric generate``
reads its prompts from the bucket and writes its generations there. A bad bucket fails first, in one line.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from fabric import storage
from fabric.config import PipelineConfig, load_config
from fabric.runtime import free_port
from tests.integration.test_llm_vllm import TINY_LLAMA
from tests.moto_s3 import forget_local_copy, keys, moto_s3
from tests.unit.serve.serving import local_ray

pytest.importorskip("peft")
pytestmark = pytest.mark.integration

BUCKET = "fabric-llm-test"
RUN_DIR = f"s3://{BUCKET}/run"
COMMON = ["name=tiny", "track.experiment=llm-s3", "llm.finetune.model_name=tiny-s3", *TINY_LLAMA]


def _cfg(*overrides: str) -> PipelineConfig:
    return load_config(None, [f"run_dir={RUN_DIR}", *COMMON, *overrides])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with moto_s3(BUCKET, cache_dir=tmp_path_factory.mktemp("fabric-cache")) as client:
        yield client


@pytest.fixture(scope="module")
def tuned(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Ray started after the AWS variables are set (its workers and replicas reach the bucket with them; Ray Data
    LLM's engines keep their downloads in this module's Hugging Face cache), and the module's fine-tune."""
    import huggingface_hub.constants

    from fabric.pipeline import finetune

    root = tmp_path_factory.mktemp("llm-s3")
    hub = str(root / "hf-hub")
    saved = huggingface_hub.constants.HF_HUB_CACHE
    huggingface_hub.constants.HF_HUB_CACHE = hub  # this process's: Ray Data LLM reads the model's config here
    locks = set(Path.home().glob("*.lock"))
    try:
        with local_ray(root / "home", fast_path=False, env={"HF_HUB_CACHE": hub}):  # its end ends Serve
            yield finetune(_cfg())
    finally:
        huggingface_hub.constants.HF_HUB_CACHE = saved
        for lock in set(Path.home().glob("*.lock")) - locks:  # Ray Data LLM's download locks (it puts them in ~)
            lock.unlink(missing_ok=True)


def test_finetuning_checkpoints_and_publishes_to_the_bucket(tuned: Any, s3: Any) -> None:
    found = keys(s3, BUCKET, "run/llm/")
    for expected in ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "merged/model.safetensors", "metrics.json",
                     "reference.parquet"):  # fmt: skip
        assert f"run/llm/{expected}" in found, expected
    run = f"run/llm/train/tiny-{tuned.metrics['run_key']}/"
    assert f"{run}checkpoint_manager_snapshot.json" in found  # uploaded by the Ray Train worker
    assert f"{run}epoch_0001/adapter/adapter_model.safetensors" in found
    assert json.loads(storage.read_text(f"{RUN_DIR}/llm/metrics.json")) == tuned.metrics
    # the worker loaded the base from the bucket, through its node's copy
    assert (storage.cache_path(f"{RUN_DIR}/llm/base") / "model.safetensors").is_file()
    assert tuned.metrics["perplexity_after"] < tuned.metrics["perplexity_before"]


def test_a_rerun_without_the_local_copy_finds_the_run_done_in_the_bucket(
    tuned: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric.train import finetune

    root = forget_local_copy(RUN_DIR)
    capsys.readouterr()
    again = finetune(_cfg())
    out = capsys.readouterr().out
    assert "fine-tuning: nothing to do" in out and "nothing new to register: v1" in out
    assert again.metrics == tuned.metrics and again.registration.version == "1"
    assert again.adapter_dir == root / "llm" / "adapter" and (again.adapter_dir / "adapter_config.json").is_file()


def test_a_base_model_in_a_bucket_is_loaded_through_this_nodes_copy(tuned: Any, tmp_path: Path) -> None:
    """``llm.model.path`` and ``llm.model.tokenizer_path`` may name bucket folders (here the run's published base);
    one that holds nothing is a ConfigError naming the field."""
    from fabric.errors import ConfigError
    from fabric.train._lm import _base, _tokenizer

    base = f"{RUN_DIR}/llm/base"
    cfg = _cfg(f"llm.model.path={base}", f"llm.model.tokenizer_path={base}")
    tokenizer = _tokenizer(cfg.llm.model, None)  # type: ignore[arg-type]  # a tokenizer is loaded, none trained
    saved = _base(cfg, tokenizer, tmp_path / "base")
    assert (saved / "config.json").is_file() and (storage.cache_path(base) / "model.safetensors").is_file()
    assert len(tokenizer) == len(_tokenizer(_cfg(f"llm.model.path={base}").llm.model, None))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"llm\.model\.path.*s3://fabric-llm-test/nothing: no files there"):
        _base(_cfg(f"llm.model.path=s3://{BUCKET}/nothing"), tokenizer, tmp_path / "none")


def test_the_transformers_engine_serves_the_run_from_the_bucket(tuned: Any) -> None:
    from fabric.monitor import get_actor
    from fabric.serve.llm import deploy

    forget_local_copy(RUN_DIR)
    cfg = _cfg(
        f"llm.serve.port={free_port()}",
        "llm.serve.engine=transformers",
        "llm.serve.replica_cpus=0",
        "llm.serve.fast_path=false",
        "monitor.detached=false",
    )
    url = deploy(cfg, timeout_s=240)
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-s3", "prompt": "the cat", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert (storage.cache_path(f"{RUN_DIR}/llm/merged") / "config.json").is_file()  # the replica's copy
    assert get_actor(cfg.llm.serve.monitor_actor) is not None  # its reference read from the bucket


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install has it)")
def test_fabric_generate_reads_and_writes_the_bucket(tuned: Any, s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli import main

    forget_local_copy(RUN_DIR)
    prompts = "".join(json.dumps({"id": f"p{i}", "prompt": f"the cat sat {i}"}) + "\n" for i in range(4))
    s3.put_object(Bucket=BUCKET, Key="in/prompts.jsonl", Body=prompts.encode())
    args = [
        f"run_dir={RUN_DIR}",
        *COMMON,
        f"llm.serve.model_path={RUN_DIR}/llm/base",
        f"llm.serve.adapters={{ft: {RUN_DIR}/llm/adapter}}",
        "llm.generate.adapter=ft",
        "llm.serve.kv_cache_gb=0.25",
        "llm.generate.max_tokens=4",
        "llm.serve.vllm={enforce_eager: true}",
    ]
    missing = ["generate", "--input", "s3://no-such-bucket/p.jsonl", "--output", f"s3://{BUCKET}/out/x.parquet"]
    assert main([*missing, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://no-such-bucket/p.jsonl" in err

    output = f"s3://{BUCKET}/out/generated.parquet"
    assert main(["generate", "--input", f"s3://{BUCKET}/in/prompts.jsonl", "--output", output, *args]) == 0
    frame = pq.read_table(output).to_pandas().sort_values("id")
    assert list(frame["id"]) == [f"p{i}" for i in range(4)]
    assert (frame["num_generated_tokens"] == 4).all() and frame["generated_text"].str.len().gt(0).all()
    assert "generate: 4 prompts" in capsys.readouterr().out


def test_a_bad_bucket_fails_first_in_one_line(s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli.stage import job_main  # what jobs/finetune.py runs
    from fabric.pipeline import finetune

    assert job_main(finetune, [*COMMON, "run_dir=s3://no-such-bucket/run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "s3://no-such-bucket/run" in err and "bucket does not exist" in err
