"""Shared fixtures: a real local Ray per test module, project paths, GPU skipping."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep Ray from spamming test output with its dedup notices and progress bars.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Serve kills a proxy that is not ready within 5 s (3 tries) while `serve.start` waits on it: on a loaded 2-core
# machine a proxy takes longer than that to start, and the app then never comes up. Give it a minute.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# Under pytest-xdist each worker keeps its Ray sessions (and Ray's "current cluster" file, which a plain
# `ray.init()` would otherwise attach to) in a temp dir of its own, so two workers' clusters never meet.
if os.environ.get("PYTEST_XDIST_WORKER") and "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository root (where pyproject.toml is)."""
    return ROOT


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A real local Ray with 2 CPUs, shared by every test of a module (start-up costs seconds)."""
    import ray

    from fabric.runtime import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Modules that start `ray start --head` heads (fixed ports such as Ray's client server's 10001, `fabric up`'s state):
# under pytest-xdist they never run at the same time (a lock file, see `_one_head_at_a_time`).
HEAD_MODULES = frozenset(
    {"test_cli_cluster", "test_submit_config", "test_two_node", "test_gcs_ft", "test_node_metrics"}
)
# The longest files first (under `--dist loadfile` whole files are handed out in collection order), so the
# two workers finish together instead of one running a long file alone at the end.
LONG_FIRST = (
    "test_llm_vllm", "test_notebooks", "test_serve_stop", "test_tune", "test_trees", "test_own_model",
    "test_finetune", "test_llm_object_storage", "test_object_storage", "test_rerun", "test_step_cache", "test_quiet",
    "test_predict", "test_train",
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Before pytest-xdist starts its workers (`-n 2`): create Ray's token once, so that two workers
    never generate it at the same moment and one never replaces the token the other's cluster started with."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and getattr(config.option, "numprocesses", None):
        from fabric.runtime import ensure_token

        ensure_token()


@pytest.fixture(scope="module", autouse=True)
def _one_head_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist, a head-starting module holds a lock file for its whole run: the other worker's
    head-starting module waits, while every other module runs beside it."""
    if request.module.__name__.rpartition(".")[2] not in HEAD_MODULES or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    with open("/tmp/fabric-tests-heads.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (stable otherwise); skip `gpu`-marked tests where no CUDA GPU is present, saying why."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmp_run_dir(tmp_path: Path) -> str:
    """A fresh run_dir for one test."""
    d = tmp_path / "runs"
    d.mkdir()
    return str(d)


def which_ray() -> str:
    """The `ray` executable of this environment."""
    import sys

    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")
