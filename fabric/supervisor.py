"""Brings a `fabric up` head's GCS back when its process dies: the head-node half of GCS fault tolerance.

With an external Redis (``fabric up --redis HOST:PORT``) a restarted GCS reloads the cluster's state from
Redis, and the raylets, actors and Serve replicas, which keep running meanwhile, reconnect to it. On
Kubernetes KubeRay restarts the head container; on a machine of one's own nothing restarts a dead
``gcs_server``, so `fabric up` starts this small process beside the head. It watches the head's
``gcs_server`` and, when that is gone while the head's raylet still runs, starts it again with the exact
command line, environment and working directory it had (Ray's GCS takes everything, its log files included,
from its arguments). It exits when the head's raylet is gone (`fabric down`, `ray stop`).

Run as ``python -m fabric.supervisor --temp-dir <head temp dir>``; it logs to stderr (`fabric up` points that
at ``<FABRIC_HOME>/gcs-supervisor.log``).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("fabric.supervisor")

# A head being stopped loses its GCS a moment before its raylet: wait this long before deciding the GCS died
# alone (and restarting it).
SETTLE_S = 1.0


@dataclass
class GcsLaunch:
    """How the GCS was started: what a restart repeats."""

    cmdline: list[str]
    env: dict[str, str]
    cwd: str


def head_process(temp_dir: str, name: str) -> psutil.Process | None:
    """The live process called ``name`` (``gcs_server``, ``raylet``) of the head whose temp dir is ``temp_dir``."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        info = proc.info
        if info.get("name") != name or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if any(temp_dir in part for part in info.get("cmdline") or []):
            return proc
    return None


def launch_of(proc: psutil.Process) -> GcsLaunch:
    """The command line, environment and working directory of a running process."""
    return GcsLaunch(cmdline=proc.cmdline(), env=proc.environ(), cwd=proc.cwd())


def restart(launch: GcsLaunch) -> int:
    """Start the GCS again, detached, as it was started; returns its pid."""
    proc = subprocess.Popen(
        launch.cmdline,
        env=launch.env,
        cwd=launch.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # the GCS writes its own log files (--stdout_filepath, --stderr_filepath)
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc.pid


def alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs (a dead child of this process, a zombie until reaped, is reaped and not alive)."""
    import psutil

    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return proc.is_running()
        proc.wait(timeout=0)  # reaps it when it is our child (a GCS this supervisor restarted)
    except (psutil.Error, psutil.TimeoutExpired):
        pass
    return False


def supervise(temp_dir: str, interval_s: float = 0.5) -> int:
    """Watch the head's GCS until its raylet is gone; returns how many times the GCS was restarted."""
    import psutil

    raylet = head_process(temp_dir, "raylet")
    gcs = head_process(temp_dir, "gcs_server")
    if raylet is None or gcs is None:
        log.error("no running head with temp dir %s (raylet %s, gcs_server %s)", temp_dir, raylet, gcs)
        return 0
    launch = launch_of(gcs)
    restarts = 0
    while alive(raylet):
        if not alive(gcs):
            time.sleep(SETTLE_S)
            if not alive(raylet):
                break
            found = head_process(temp_dir, "gcs_server")  # someone else may have started it meanwhile
            if found is None:
                pid = restart(launch)
                restarts += 1
                log.warning("the GCS of %s died; restarted it with its command line (pid %d)", temp_dir, pid)
                found = psutil.Process(pid)
            gcs = found
        time.sleep(interval_s)
    log.info("the head's raylet is gone (the head was stopped): exiting after %d GCS restart(s)", restarts)
    return restarts


def main(argv: list[str] | None = None) -> int:
    """``python -m fabric.supervisor --temp-dir DIR``."""
    p = argparse.ArgumentParser(prog="python -m fabric.supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--temp-dir", required=True, help="the head's Ray temp dir (on every head process's command line)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between checks (default %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    supervise(args.temp_dir, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
