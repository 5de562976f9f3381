"""Helpers of the real-Serve integration tests: a local Ray on Serve's fast path, free ports, bounded waits."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fabric.serve.spec import FAST_PATH_ENV, SIDE_PORT_VARS, fast_path_ports_env


def wait_for(cond: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (returned), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextlib.contextmanager
def local_ray(fabric_home: Path, fast_path: bool = True, env: dict[str, str] | None = None) -> Iterator[None]:
    """A local 2-CPU Ray (with its dashboard, on 127.0.0.1) with FABRIC_HOME and ``env`` set, and with
    ``fast_path`` the fast path's environment (it must be there before Ray starts) with HAProxy's side ports
    free (other Serves may run on this machine). Everything set is restored afterwards."""
    import ray

    extra = dict(env or {})
    if fast_path:
        extra.update(FAST_PATH_ENV)
        extra.update(fast_path_ports_env())
    extra["FABRIC_HOME"] = str(fabric_home)
    saved = {k: os.environ.get(k) for k in (*extra, *SIDE_PORT_VARS)}
    os.environ.update(extra)
    if ray.is_initialized():
        ray.shutdown()
    from fabric.runtime import free_port, start_local_ray

    # the dashboard serves Serve's REST API, through which fabric deploys
    start_local_ray(
        num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(), log_to_driver=False
    )
    try:
        yield
    finally:
        # ray.shutdown ends Serve with the local Ray; serve.shutdown would first drain each replica's
        # direct-ingress port for its graceful period (tens of seconds)
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fast_path_ray(fabric_home: Path) -> contextlib.AbstractContextManager[None]:
    """:func:`local_ray` on Serve's fast path."""
    return local_ray(fabric_home, fast_path=True)
