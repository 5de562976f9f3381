"""`fabric down`: stop what `fabric up` started, and only that."""

from __future__ import annotations

import argparse

from fabric import runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`fabric down` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Stop the recorded head's processes (never other Ray instances on this machine)."""
    head = runtime.read_head()
    if head is None:
        print("No cluster started by `fabric up` is recorded; nothing to stop.")
        return 0
    count = runtime.stop_head()
    if count:
        print(f"Stopped the Ray head at {head.gcs_address} ({count} processes).")
    else:
        print(f"The Ray head at {head.gcs_address} was not running; cleared its record.")
    return 0
