"""The entry point of every ``jobs/*.py`` file: a stage run from the command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fabric.config import PipelineConfig


def job_main(stage: Callable[[PipelineConfig], object], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one stage from the command line: ``--config PATH [section.field=value ...]``.

    Used by every ``jobs/*.py`` file, so a job behaves the same under ``python``, ``ray job submit``
    and ``fabric submit``. A config problem exits 2 with one line per problem; a FabricError raised by
    the stage exits 1 with its message; neither prints a traceback.
    """
    import argparse

    from fabric.config import load_config
    from fabric.errors import ConfigError, FabricError

    parser = argparse.ArgumentParser(prog=prog, description=(stage.__doc__ or "").strip().split("\n")[0] or None)
    parser.add_argument("--config", help="pipeline YAML (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        stage(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FabricError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
