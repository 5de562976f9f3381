"""`fabric tune ...` whose driver gets Ctrl-C (a real SIGINT) the moment its N-th trial starts.

    python -m tests.integration.interrupting_tune N tune <config> [overrides ...]

A Ray Tune callback, added to the run's RunConfig, sends the signal from the driver's main thread, so the
interrupt lands at the same point of the search on every run however busy the machine is. Nothing else
about the command changes.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ray import tune

from fabric.cli import main


class CtrlCAtTrial(tune.Callback):
    """Sends this process SIGINT when the ``n``-th trial starts.

    Tune saves the run's callbacks with the experiment and restores them on resume: only the process that
    created this one is interrupted, not the resuming `fabric tune --resume`.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.started = 0
        self.pid = os.getpid()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started += 1
        if self.started == self.n and os.getpid() == self.pid:
            print(f"interrupting at the start of trial {self.n} ({trial.trial_id})", flush=True)
            os.kill(os.getpid(), signal.SIGINT)


def _with_callback(n: int) -> type:
    class RunConfig(tune.RunConfig):
        def __post_init__(self) -> None:
            self.callbacks = [*(self.callbacks or []), CtrlCAtTrial(n)]
            super().__post_init__()

    return RunConfig


if __name__ == "__main__":
    tune.RunConfig = _with_callback(int(sys.argv[1]))  # type: ignore[misc]  # fabric.tune reads tune.RunConfig
    sys.exit(main(sys.argv[2:]))
