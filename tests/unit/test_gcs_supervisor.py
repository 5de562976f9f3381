"""The GCS supervisor of `fabric up --redis` (``python -m fabric.runtime supervise-gcs``) on real processes:
stand-ins for a head's ``raylet`` and ``gcs_server`` (copies of ``sleep`` under those names, inside the head's
temp dir, so that the temp dir is on their command lines as it is on a Ray head's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fabric.runtime import head_process

SLEEP = shutil.which("sleep")


def _wait(cond: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def _ours(temp_dir: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] in ("raylet", "gcs_server") and temp_dir in " ".join(p.info["cmdline"] or [])
    ]


@pytest.fixture
def temp_dir(tmp_path: Path) -> Iterator[str]:
    """A stand-in head (raylet, gcs_server) and its supervisor; all of them stopped after."""
    if SLEEP is None:
        pytest.skip("needs sleep(1) for stand-in processes")
    folder = tmp_path / "ray-temp"
    folder.mkdir()
    for name in ("raylet", "gcs_server"):
        shutil.copy(SLEEP, folder / name)
        subprocess.Popen([str(folder / name), "600"], cwd=tmp_path, start_new_session=True)
    yield str(folder)
    for p in _ours(str(folder)):
        p.kill()


def _supervisor(temp_dir: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fabric.runtime", "supervise-gcs", f"--temp-dir={temp_dir}", "--interval=0.1"],
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_dead_gcs_is_started_again_as_it_was_until_the_head_stops(temp_dir: str) -> None:
    sup = _supervisor(temp_dir)
    try:
        started_as = _wait(lambda: head_process(temp_dir, "gcs_server")).cmdline()
        time.sleep(1)  # the supervisor has read its command line
        for _ in range(2):  # the second time the dead GCS is the supervisor's own child
            gone = head_process(temp_dir, "gcs_server")
            assert gone is not None
            cmdline, cwd = gone.cmdline(), gone.cwd()
            gone.kill()
            again = _wait(lambda g=gone: (p := head_process(temp_dir, "gcs_server")) and p.pid != g.pid and p)
            assert again.cmdline() == cmdline == started_as and again.cwd() == cwd
            assert sup.poll() is None
        # the head stops (its raylet first here): the supervisor exits, and a GCS that dies after stays dead
        raylet = head_process(temp_dir, "raylet")
        assert raylet is not None
        raylet.kill()
        assert sup.wait(timeout=30) == 0
        gcs = head_process(temp_dir, "gcs_server")
        assert gcs is not None
        gcs.kill()
        time.sleep(2)
        assert head_process(temp_dir, "gcs_server") is None
    finally:
        if sup.poll() is None:
            sup.kill()
        _, err = sup.communicate(timeout=30)
    assert err.count("restarted it with its command line") == 2, err


def test_a_head_stopped_as_a_whole_is_not_started_again(temp_dir: str) -> None:
    sup = _supervisor(temp_dir)
    try:
        time.sleep(1)
        for p in _ours(temp_dir):  # as `ray stop` does: GCS and raylet within a moment
            p.kill()
        assert sup.wait(timeout=30) == 0
        assert _ours(temp_dir) == []
    finally:
        if sup.poll() is None:
            sup.kill()
        _, err = sup.communicate(timeout=30)
    assert "restarted" not in err, err


def test_without_a_running_head_it_says_so_and_exits(tmp_path: Path) -> None:
    sup = _supervisor(str(tmp_path / "nothing"))
    _, err = sup.communicate(timeout=30)
    assert sup.returncode == 0 and "no running head" in err
