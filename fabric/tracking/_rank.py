"""Rank-0 side effects: only the first worker of a Ray Train run logs and writes registry entries."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def world_rank() -> int:
    """This process's rank in a Ray Train worker group; 0 outside one (the driver, a plain script).

    Ray Train's context is read only when ``ray.train`` is already imported: every Train worker has it,
    and a driver that never touched Ray Train should not pay for importing it. Outside Ray Train,
    torchrun's ``RANK`` is honoured, so the guard also holds under plain ``torch.distributed``.
    """
    train = sys.modules.get("ray.train")
    if train is not None:
        try:
            return int(train.get_context().get_world_rank())
        except (RuntimeError, AttributeError):
            pass  # "cannot be used outside of a Ray Train training function": the driver
    return int(os.environ.get("RANK", "0") or 0)


def is_rank_zero() -> bool:
    """True where side effects (tracking, registry writes) belong."""
    return world_rank() == 0


def on_rank_zero(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Run ``fn`` on rank 0 only; elsewhere it returns None without doing anything.

    Like accelerate's ``@on_main_process``: decorate anything that writes to MLflow, W&B or the registry.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if not is_rank_zero():
            return None
        return fn(*args, **kwargs)

    return wrapper
