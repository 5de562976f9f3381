"""The fast path's worker setup hook: HAProxy's side listeners on Serve's host, HAProxy tied to its spawner, and a
start that finds its port held naming the holder. No Ray cluster: Ray's own template and real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fabric.errors import UsageError
from fabric.serve import haproxy_guard
from fabric.serve.control import check_ports_free
from fabric.serve.spec import FAST_PATH_ENV


def _render(host: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The bind lines of the HAProxy config Ray writes for Serve on ``host``, with the hook's template."""
    from ray.serve._private import haproxy
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(
        haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy_guard.bind_like_frontend(haproxy.HAPROXY_CONFIG_TEMPLATE)
    )
    cfg = haproxy.HAProxyConfig(
        http_options=HTTPOptions(host=host, port=8123),
        stats_port=8404,
        metrics_port=9101,
        socket_path=str(tmp / "admin.sock"),
        server_state_base=str(tmp),
        server_state_file=str(tmp / "server-state"),
    )
    api = haproxy.HAProxyApi(cfg, config_file_path=str(tmp / "haproxy.cfg"))
    api._generate_config_file_internal()
    text = (tmp / "haproxy.cfg").read_text()
    return sorted(line.strip() for line in text.splitlines() if line.strip().startswith("bind "))


def test_the_fast_path_environment_names_the_hook() -> None:
    assert FAST_PATH_ENV[haproxy_guard.HOOK_VAR] == "fabric.serve.haproxy_guard.install"
    from ray._common.utils import load_class
    from ray._private import ray_constants

    assert haproxy_guard.HOOK_VAR == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    assert load_class(haproxy_guard.HOOK) is haproxy_guard.install


def test_side_listeners_bind_the_frontends_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _render("127.0.0.1", tmp_path, monkeypatch)
    assert local == ["bind 127.0.0.1:8123", "bind 127.0.0.1:8404", "bind 127.0.0.1:9101"]
    # serve.host opens the frontend: the side listeners follow it, as Ray binds them without the hook.
    assert _render("0.0.0.0", tmp_path, monkeypatch) == ["bind *:8123", "bind *:8404", "bind *:9101"]


def test_a_template_without_the_known_lines_is_left_alone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert haproxy_guard.bind_like_frontend("listen stats\n  bind 10.0.0.1:1\n") == "listen stats\n  bind 10.0.0.1:1\n"
    assert "side listeners keep Ray's binds" in caplog.text
    patched = haproxy_guard.bind_like_frontend("bind :{{ config.metrics_port }}\nbind *:{{ config.stats_port }}\n")
    caplog.clear()
    assert haproxy_guard.bind_like_frontend(patched) == patched and not caplog.text  # idempotent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_haproxy_dies_with_the_process_that_spawned_it(tmp_path: Path) -> None:
    """A process with the hook installed spawns "haproxy" (here `sleep` under that name) through asyncio, as
    Serve's HAProxyManager does, and is then SIGKILLed: the kernel takes "haproxy" down with it."""
    fake = tmp_path / "haproxy"
    fake.symlink_to(Path("/bin/sleep") if Path("/bin/sleep").exists() else Path("/usr/bin/sleep"))
    spawner = textwrap.dedent(
        f"""
        import asyncio, os, sys, time
        from fabric.serve import haproxy_guard
        haproxy_guard.install()
        async def main():
            proc = await asyncio.create_subprocess_exec({str(fake)!r}, "300")
            print(proc.pid, flush=True)
        asyncio.run(main())
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", spawner], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))  # type: ignore[union-attr]
        assert child.is_running() and child.ppid() == parent.pid
        parent.kill()
        parent.wait(timeout=30)
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the spawned haproxy outlived its spawner"
    finally:
        parent.kill()
        parent.wait(timeout=30)


def test_other_programs_are_spawned_unchanged() -> None:
    code = textwrap.dedent(
        """
        import asyncio
        from fabric.serve import haproxy_guard
        haproxy_guard.install()
        async def main():
            proc = await asyncio.create_subprocess_exec("cat", "/proc/self/status", stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            print([l for l in out.decode().splitlines() if l.startswith("PPid")][0])
        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("PPid"), out.stderr


def test_a_held_port_names_its_holder() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(
            UsageError, match=rf"serve\.port: port {port} on 127\.0\.0\.1 is held by process {os.getpid()} \("
        ):
            check_ports_free("127.0.0.1", {port: "serve.port"})
        with pytest.raises(UsageError, match="RAY_SERVE_HAPROXY_STATS_PORT"):
            check_ports_free("0.0.0.0", {port: "RAY_SERVE_HAPROXY_STATS_PORT"})
        check_ports_free("127.0.0.2", {port: "serve.port"})  # another loopback address: no clash
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # closed: free again
        try:
            check_ports_free("127.0.0.1", {port: "serve.port"})
            break
        except UsageError:
            time.sleep(0.1)
    else:
        pytest.fail("a closed port still reads as held")
