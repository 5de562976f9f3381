"""`fabric validate`: check a pipeline config without running anything."""

from __future__ import annotations

import argparse

from fabric.config import dump_config, load_config


ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric validate`."""
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=4")
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved config")


def run(args: argparse.Namespace) -> int:
    """Exit 0 and say so when the config is valid; ConfigError (exit 2) lists every problem otherwise."""
    cfg = load_config(args.config, args.overrides)
    if args.show:
        print(dump_config(cfg), end="")
    print(f"{args.config}: OK")
    return 0
