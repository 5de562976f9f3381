"""`serve run cluster/serve.yaml` works: Ray's own CLI deploys the committed Serve config on a local Ray.

The file is used as committed (both applications, their import paths, the configs they name by relative
paths, the fast-path controller environment) with two changes a test needs: a free port, and overrides
that point the apps at tiny fixture models instead of what a pipeline run and a fine-tuning run would
have written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml

from fabric import runtime
from fabric.runtime import free_port
from fabric.serve.spec import fast_path_ports_env
from tests.llm_fixtures import tiny_llm
from tests.unit.serve.models import encode, make_model, reference, softmax

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
LLM = "tiny-llm"
START_TIMEOUT_S = 240


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user would (serve run then shuts Serve and its Ray down); killed if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("cluster-serve")
    model = make_model(root / "model", seed=3)
    llm_run = tiny_llm(root / "llm-run")
    config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    apps = {app["import_path"].rsplit(":", 1)[1]: app for app in config["applications"]}
    ours = {
        "build_app": [
            f"serve.model_uri={model}",
            f"serve.model_name={MODEL}",
            f"run_dir={root / 'runs'}",
            "monitor.enabled=false",
            "serve.replica_cpus=0",  # the 2-core machine is shared
        ],
        "build_openai_app": [
            f"run_dir={llm_run}",
            f"llm.serve.model_path={llm_run / 'llm' / 'base'}",
            f"llm.serve.adapters={{finetuned: {llm_run / 'llm' / 'adapter'}}}",
            f"llm.serve.served_name={LLM}",
            "llm.serve.engine=transformers",  # the tiny GPT-2's adapter (vLLM has no LoRA for GPT-2: test_llm_vllm)
            "llm.serve.monitor=false",
            "llm.serve.replica_cpus=0",
        ],
    }
    assert set(apps) == set(ours)
    for builder, overrides in ours.items():
        apps[builder]["args"]["overrides"] = [*apps[builder]["args"].get("overrides", []), *overrides]
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = (root / "serve-run.log").open("w")
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # HAProxy's own stats and metrics listeners default to fixed ports (8404, 9101) and the replicas'
        # direct-ingress ports to fixed ranges: free ones, so this Serve never collides with another on the machine.
        **fast_path_ports_env(),
    }
    serve_bin = str(Path(sys.executable).with_name("serve"))
    # From the project root, like the file's header says: the app's `config:` path is relative to it.
    proc = subprocess.Popen(
        [serve_bin, "run", str(path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{(root / 'serve-run.log').read_text()[-3000:]}")
            try:
                tabular = httpx.get(f"{url}/v2/health/ready", timeout=2)
                llm = httpx.get(f"{url}/llm/v1/models", timeout=2)
                if tabular.status_code == 200 and tabular.json() == {"ready": True} and llm.status_code == 200:
                    break
            except (httpx.HTTPError, ValueError):
                pass  # Serve's proxy is not up yet, or answers 404 until the apps are deployed
            if time.monotonic() > deadline:
                pytest.fail(f"not ready in {START_TIMEOUT_S}s:\n{(root / 'serve-run.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "model": model, "proc": proc, "port": port}
    finally:
        _stop(proc)
        log.close()


def test_serve_run_of_the_cluster_config_serves_the_model(served: dict[str, Any]) -> None:
    url, model = served["url"], served["model"]
    rows = [{"age": 30, "income": 70.0, "city": "oslo"}, {"age": 61, "income": 12.5, "city": "paris"}]
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"instances": rows}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL and body["model_version"] == "v1"
    out = {o["name"]: o for o in body["outputs"]}["probabilities"]
    probs = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(probs, softmax(reference(model, encode(rows))), atol=1e-5)
    meta = httpx.get(f"{url}/v2/models/{MODEL}", timeout=10).json()
    assert meta["name"] == MODEL and meta["versions"] == ["v1"]


def test_bad_input_is_a_4xx_naming_the_field(served: dict[str, Any]) -> None:
    r = httpx.post(f"{served['url']}/v2/models/{MODEL}/infer", json={"instances": [{"age": 30}]}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert "income" in r.text or "city" in r.text, r.text


def test_the_language_model_app_answers_the_openai_client_under_its_prefix(served: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/llm/v1", api_key="unused", timeout=60, max_retries=0)
    assert {m.id for m in client.models.list()} >= {LLM, f"{LLM}:finetuned"}
    chat = client.chat.completions.create(
        model=f"{LLM}:finetuned", messages=[{"role": "user", "content": "the cat"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert 0 < chat.usage.completion_tokens <= 8


def test_sigterm_and_ray_stop_leave_no_haproxy_and_its_listeners_were_on_loopback(served: dict[str, Any]) -> None:
    """The way the issue saw HAProxy outlive `serve run`: SIGTERM to its process group, then `ray stop`."""
    proc: subprocess.Popen = served["proc"]
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while True:  # HAProxy reloads as routes arrive: wait until one holds all three of its ports
        procs = [root, *root.children(recursive=True)]
        listening = runtime.listeners(procs)
        haproxy = [(ip, port) for ip, port, label in listening if label.startswith("haproxy")]
        if len(haproxy) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Serve's host is 127.0.0.1 in the config: so are the stats page and the Prometheus exporter.
    assert len(haproxy) >= 3 and {ip for ip, _ in haproxy} <= set(runtime.LOOPBACK_IPS), listening
    haproxies = [p for p in procs if p.is_running() and runtime.process_label(p).startswith("haproxy")]
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    # `ray stop` for this Ray only (others run on this machine): its processes, not HAProxy, unknown to it.
    runtime.stop_processes([p for p in procs[1:] if p not in haproxies and p.is_running()])
    _, alive = psutil.wait_procs(haproxies, timeout=30)
    assert alive == [], f"HAProxy outlived its Serve: {alive}"
    ports = {port for _, port in haproxy}
    held = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
    assert held == [], held
