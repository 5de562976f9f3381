"""Quiet by default, Ray's chatter with -v: the CLI and job flags, and what quiet mode lets through (no Ray started)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.cli import main, verbosity
from tests.conftest import ROOT

SMOKE = str(ROOT / "jobs" / "configs" / "pipeline_smoke.yaml")


@pytest.fixture(autouse=True)
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test leaves this process as Ray left it (and its environment as it was)."""
    monkeypatch.setenv(verbosity.ENV, "")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    yield
    verbosity.configure(True)


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["validate", SMOKE], False),
        (["-v", "validate", SMOKE], True),
        (["validate", SMOKE, "--verbose"], True),
        (["validate", "-v", SMOKE, "train.epochs=2"], True),
    ],
)
def test_the_cli_takes_v_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    assert main(argv) == 0
    assert verbosity.is_verbose() is verbose


def test_jobs_take_v_anywhere_and_pass_the_rest_on() -> None:
    rest = verbosity.from_argv(["--config", "x.yaml", "-v", "train.epochs=2"])
    assert rest == ["--config", "x.yaml", "train.epochs=2"]
    assert verbosity.is_verbose()
    assert verbosity.from_argv(["--config", "x.yaml"]) == ["--config", "x.yaml"]
    assert not verbosity.is_verbose()


def _forwarded(batches: list[dict[str, Any]]) -> list[str]:
    """The lines Ray's log forwarding hands its printers for ``batches``."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    seen: list[str] = []
    dispatcher.add_handler("test-recorder", lambda data: seen.extend(data["lines"]))
    try:
        for batch in batches:
            dispatcher.emit(batch)
    finally:
        dispatcher.remove_handler("test-recorder")
    return seen


BATCHES = [
    {"pid": 11, "is_err": False, "lines": ["epoch 1/2  train_loss 0.5"], "actor_name": "RayTrainWorker"},
    {"pid": 12, "is_err": True, "lines": ["Failed to query Ray Train Controller actor state."]},
    {"pid": "raylet", "is_err": True, "lines": ["A worker died: the node ran out of memory"]},
    {"pid": "autoscaler", "is_err": False, "lines": ["Warning: the request cannot be scheduled"]},
]


def test_quiet_forwards_worker_stdout_only_without_prefix_and_v_forwards_everything() -> None:
    import ray._private.ray_constants as constants
    import ray.data

    prefix, bars = constants.RAY_DISABLE_WORKER_LOG_PREFIX, ray.data.DataContext.get_current().enable_progress_bars
    verbosity.configure(False)
    assert _forwarded(BATCHES) == [
        "epoch 1/2  train_loss 0.5",
        "A worker died: the node ran out of memory",
        "Warning: the request cannot be scheduled",
    ]
    assert constants.RAY_DISABLE_WORKER_LOG_PREFIX is True
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"

    verbosity.configure(True)
    assert len(_forwarded(BATCHES)) == 4
    assert constants.RAY_DISABLE_WORKER_LOG_PREFIX is prefix
    assert ray.data.DataContext.get_current().enable_progress_bars is bars
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ


def _log_lines() -> str:
    """What Ray's console handlers print for some Ray log records."""
    out = io.StringIO()
    handlers = verbosity._console_handlers()
    # Swapped without setStream, which flushes the old stream: a handler made when Ray was first imported holds the
    # stream pytest captured then, closed by now when another test imported Ray first.
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.stream = out
    logging.getLogger("ray._private.authentication.setup").warning(
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    )
    logging.getLogger("ray.data.dataset").warning(
        "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless..."
    )
    logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset d_0: InputDataBuffer")
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    logging.getLogger("ray.data.dataset").warning("a real problem with the data")
    logging.getLogger("ray.tune").error("a trial failed")
    for h, stream in zip(handlers, streams, strict=True):
        h.stream = stream
    return out.getvalue()


def test_quiet_shows_ray_warnings_and_errors_except_those_of_healthy_runs() -> None:
    import ray.data  # noqa: F401  (Ray Data's logger is configured on import)

    verbosity.configure(False)
    quiet = _log_lines()
    for chatter in ("Token authentication", "will hang", "Execution plan", "Started a local Ray"):
        assert chatter not in quiet
    assert "a real problem with the data" in quiet and "a trial failed" in quiet

    verbosity.configure(True)
    verbose = _log_lines()
    for line in ("Token authentication", "will hang", "Execution plan", "Started a local Ray", "a trial failed"):
        assert line in verbose
