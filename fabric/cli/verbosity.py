"""Quiet by default: fabric's own lines (one per stage step and per epoch), Ray's chatter only with ``-v``.

Quiet (the default), for the process that drives the work (the `fabric` command, a ``jobs/*.py`` file):

* worker processes' **stderr** is not forwarded to this terminal (Ray Train's and Ray Data's actor logs,
  "Failed to query Ray Train Controller actor state", C++ ``core_worker`` lines, deprecation warnings);
  their **stdout** still is, without Ray's ``(Actor pid=…)`` prefix: that is where fabric's epoch lines and a
  user's own ``print`` go. Raylet and autoscaler messages (out of memory, unschedulable requests) still show.
* Ray's loggers on this process show warnings and errors only, minus :data:`BENIGN` (warnings that healthy
  runs print); Ray Data's progress bars are off; MLflow logs warnings only.
* ``FABRIC_VERBOSE`` is ``0`` (``1`` with ``-v``) for stages that choose their own libraries' verbosity.

Everything still reaches Ray's log files (``/tmp/ray/session_latest/logs``). ``-v`` leaves Ray as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

ENV = "FABRIC_VERBOSE"
# Commands that start Ray work in this process (the others only talk to Ray's REST API or read a config).
IN_PROCESS_RAY = frozenset(
    {"run", "tune", "serve", "monitor", "finetune", "serve-llm", "generate", "eval-llm", "predict"}
)
HELP = "show Ray's own logs too: worker and actor logs, Ray Data progress, Tune's tables, library warnings"
# Warnings Ray prints on runs that are healthy (quiet mode drops them; -v shows them).
BENIGN = (
    # fabric turns token authentication on on purpose
    "Token authentication is enabled for this Ray cluster",
    # printed when a dataset starts while Tune's last trials still hold the CPUs; they free them moments later
    "does not have any available CPUs",
    # the consequence of quiet mode itself
    "Progress bars disabled",
)
# Loggers with console handlers of their own (ray.train and ray.tune propagate to "ray"); file handlers keep all.
_LOGGERS = ("ray", "ray.data", "ray.serve", "mlflow")
# Read by the libraries when they start (a variable the user set wins).
# MLflow's INFO lines; Tune's header and status tables (with tune's verbose=0 in quiet mode, see fabric.tune).
_QUIET_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_AIR_NEW_OUTPUT": "0"}
_saved: dict[str, Any] = {}


def add_flag(parser: argparse.ArgumentParser, default: Any = False) -> None:
    """Add ``-v/--verbose`` to ``parser`` (``default=argparse.SUPPRESS`` on subcommands keeps a global -v)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help=HELP)


def from_argv(argv: list[str] | None) -> list[str]:
    """For ``jobs/*.py``: apply ``-v``/``--verbose`` if present in ``argv`` and return the other words."""
    import sys

    words = list(sys.argv[1:] if argv is None else argv)
    verbose = any(w in ("-v", "--verbose") for w in words)
    configure(verbose)
    return [w for w in words if w not in ("-v", "--verbose")]


def is_verbose() -> bool:
    """True when the entry point was given ``-v``."""
    return os.environ.get(ENV) == "1"


def configure(verbose: bool, ray: bool = True) -> None:
    """Quiet (``verbose=False``) or Ray's own output (``True``) for this process; call before connecting to Ray.

    Args:
        verbose: show Ray's chatter as Ray prints it.
        ray: also set up Ray's side (imports Ray when installed); False for commands that never start Ray work.
    """
    os.environ[ENV] = "1" if verbose else "0"
    if verbose:
        _restore()
        return
    if not ray:
        return
    for name, value in _QUIET_ENV.items():
        if name not in os.environ:
            os.environ[name] = value
            _saved[f"env:{name}"] = None
    if importlib.util.find_spec("ray") is not None:
        _quiet_ray()


class _Benign(logging.Filter):
    """Drops the warnings of :data:`BENIGN`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in BENIGN)


_FILTER = _Benign()


def _quiet_ray() -> None:
    import ray._private.ray_constants as constants
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.util.annotations import RayDeprecationWarning

    if "emit" not in _saved:
        _saved["emit"] = dispatcher.emit
        dispatcher.emit = _stdout_only(dispatcher.emit)  # type: ignore[method-assign]
    # Read when ray.init starts forwarding worker output.
    _saved.setdefault("prefix", constants.RAY_DISABLE_WORKER_LOG_PREFIX)
    constants.RAY_DISABLE_WORKER_LOG_PREFIX = True
    if importlib.util.find_spec("ray.data") is not None:
        import ray.data  # configures the ray.data logger, which must happen before its level is set

        context = ray.data.DataContext.get_current()
        _saved.setdefault("progress", context.enable_progress_bars)
        context.enable_progress_bars = False
    for handler in _console_handlers():
        if f"handler:{id(handler)}" not in _saved:
            _saved[f"handler:{id(handler)}"] = (handler, handler.level)
            handler.setLevel(max(logging.WARNING, handler.level))
            handler.addFilter(_FILTER)
    if "warnings" not in _saved:
        _saved["warnings"] = warnings.filters[:]
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)


def _console_handlers() -> list[logging.Handler]:
    """The handlers of :data:`_LOGGERS` that write to the terminal (configured ones only: no logger is created)."""
    configured = logging.Logger.manager.loggerDict
    return [
        h
        for name in _LOGGERS
        if isinstance(configured.get(name), logging.Logger)
        for h in logging.getLogger(name).handlers
        # Ray's and the libraries' own console handlers, not a file or a test harness's capture
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and type(h).__module__.partition(".")[0] in ("ray", "mlflow", "logging")
    ]


def _stdout_only(emit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def emit_quiet(batch: dict[str, Any]) -> None:
        if batch.get("is_err") and batch.get("pid") not in ("raylet", "autoscaler"):
            return
        emit(batch)

    return emit_quiet


def _restore() -> None:
    """Undo :func:`_quiet_ray` (``-v`` after a quiet setup, as tests do)."""
    if not _saved:
        return
    if "emit" in _saved:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.emit = _saved["emit"]  # type: ignore[method-assign]
    if "prefix" in _saved:
        import ray._private.ray_constants as constants

        constants.RAY_DISABLE_WORKER_LOG_PREFIX = _saved["prefix"]
    if "progress" in _saved:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = _saved["progress"]
    for key, value in _saved.items():
        if key.startswith("handler:"):
            handler, level = value
            handler.setLevel(level)
            handler.removeFilter(_FILTER)
    if "warnings" in _saved:
        warnings.filters[:] = _saved["warnings"]
    for key in _saved:
        if key.startswith("env:"):
            os.environ.pop(key.removeprefix("env:"), None)
    _saved.clear()
