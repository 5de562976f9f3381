"""Keeps Serve's HAProxy (the fast path's ingress) on the address Serve was given, and tied to its manager.

Ray 2.60 renders HAProxy's config from a fixed template (``ray/serve/_private/haproxy_templates.py``): the
frontend binds ``http_options.host``, but the Prometheus exporter (``bind :<metrics port>``) and the stats page
(``bind *:<stats port>``) always bind every interface, and no variable or option changes that. And the HAProxy
process is a plain child of the ``HAProxyManager`` actor: when that actor's process is killed (``ray stop``, a
killed driver whose local Ray goes with it, a failed start) HAProxy is re-parented to init and keeps its ports,
and the next Serve on the machine fails with "cannot bind socket".

:func:`install` is a Ray worker setup hook, run first thing in each worker process started with the fast
path's environment (``spec.FAST_PATH_ENV`` names it; Ray reads it when the worker starts, before the
HAProxyManager's module is imported). It changes three things in that process only:

- the template's two side ``bind`` lines take the frontend's host (``127.0.0.1`` unless ``serve.host`` opens
  it; ``*`` when the host is ``0.0.0.0``), the least invasive way: one string, when Ray imports it (not
  before: importing it loads all of Serve, which most workers never need);
- HAProxy processes are spawned with ``PR_SET_PDEATHSIG`` (as Ray spawns its own processes), so the kernel
  kills HAProxy when the process that spawned it dies, however it dies;
- on a Ray whose node address is loopback (fabric's local Ray, `fabric up` without --node-ip), gRPC servers
  that Ray binds to ``[::]`` (each replica's inter-deployment server) bind 127.0.0.1, where their peers
  reach them anyway.

If a later Ray changes the template lines, a warning says so and the binds stay as Ray makes them
(tests/integration/test_serve_stop.py lists every listener and fails then).
"""

from __future__ import annotations

import importlib.abc
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# The hook's module path, in the form Ray's worker setup hook takes.
HOOK = f"{__name__}.install"
# The variable Ray's workers read their setup hook from. Ray sets it from ``runtime_env`` 's
# ``worker_process_setup_hook`` at the job level only, and Serve's ``controller_options`` pass env_vars alone,
# so fabric sets the variable itself; Serve's actors inherit it from the controller like the other variables.
HOOK_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SIDE_BINDS = {
    "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
    "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
}


def bind_like_frontend(template: str) -> str:
    """The HAProxy config template with the side listeners bound to the frontend's host."""
    missing = [old for old, new in SIDE_BINDS.items() if old not in template and new not in template]
    if missing:
        log.warning("Ray's HAProxy template lacks %s: its side listeners keep Ray's binds", ", ".join(missing))
    for old, new in SIDE_BINDS.items():
        template = template.replace(old, new)
    return template


def _prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), resolved before any fork: a forked child must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (AttributeError, OSError):
        return None


def _die_with(parent: int, prctl: Callable[..., int]) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when ``parent`` (the spawning process) dies."""

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above ran
            os._exit(1)

    return preexec


def _tie_haproxy_to_its_spawner() -> None:
    import asyncio

    spawn = asyncio.create_subprocess_exec
    prctl = _prctl()
    if prctl is None or getattr(spawn, "_fabric_guarded", False):
        return

    async def create_subprocess_exec(program: Any, *args: Any, **kwargs: Any) -> Any:
        if os.path.basename(str(program)).startswith("haproxy") and kwargs.get("preexec_fn") is None:
            kwargs["preexec_fn"] = _die_with(os.getpid(), prctl)
        return await spawn(program, *args, **kwargs)

    create_subprocess_exec._fabric_guarded = True  # type: ignore[attr-defined]
    asyncio.create_subprocess_exec = create_subprocess_exec  # type: ignore[assignment]


def _on_loopback_node(bind: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``add_port_to_grpc_server(server, address)``: ``[::]:port`` becomes ``127.0.0.1:port`` on a node
    whose address is loopback."""

    def add_port_to_grpc_server(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            import ray

            if ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
                address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)

    add_port_to_grpc_server._fabric_guarded = True  # type: ignore[attr-defined]
    return add_port_to_grpc_server


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported (found by the other finders, as usual)."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader.exec_module = self._then_patch(spec.loader.exec_module)  # type: ignore[method-assign]
                return spec
        return None

    def _then_patch(self, run: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
        def exec_module(module: ModuleType) -> None:
            run(module)
            self.patch(module)

        return exec_module


def _patch_template(module: ModuleType) -> None:
    module.HAPROXY_CONFIG_TEMPLATE = bind_like_frontend(module.HAPROXY_CONFIG_TEMPLATE)  # type: ignore[attr-defined]


def install() -> None:
    """The worker setup hook: HAProxy's side listeners bind the frontend's host, HAProxy dies with its manager,
    and a loopback node's ``[::]`` gRPC servers bind 127.0.0.1."""
    templates = "ray.serve._private.haproxy_templates"
    if templates in sys.modules:
        _patch_template(sys.modules[templates])
        loaded = sys.modules.get("ray.serve._private.haproxy")
        if loaded is not None:  # it holds its own reference to the template
            loaded.HAPROXY_CONFIG_TEMPLATE = sys.modules[templates].HAPROXY_CONFIG_TEMPLATE
    elif not any(isinstance(f, _AfterImport) and f.name == templates for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(templates, _patch_template))
    _tie_haproxy_to_its_spawner()
    from ray._common import tls_utils

    if not getattr(tls_utils.add_port_to_grpc_server, "_fabric_guarded", False):
        tls_utils.add_port_to_grpc_server = _on_loopback_node(tls_utils.add_port_to_grpc_server)
