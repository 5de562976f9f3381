"""A new local Ray whose start timed out is started once more, and the failed start leaves no process behind.

Ray's raylet waits 15 s for its dashboard agent to report its ports, then gives up, and ``ray.init`` fails ("The
current node timed out during startup"): on a machine whose cores are busy the agent's imports take that long (a
notebook's Ray failed so in a CI-equivalent run beside a `make demo` loop). Here the agent of the first start is
really slowed (a ``sitecustomize`` on the driver's path, which Ray's processes inherit), once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SLOW_AGENT = """
import os, sys, time
marker = os.environ.get("SLOW_AGENT_MARKER")
if marker and any("dashboard/agent.py" in a for a in sys.argv) and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(25)  # past the raylet's 15 s wait for the agent's ports: the first start fails
"""

DRIVER = """
import psutil, ray
from fabric.runtime import connect

connect(None, num_cpus=1, include_dashboard=False)
print("answer", ray.get(ray.remote(lambda: 41 + 1).remote()))
ray.shutdown()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", [" ".join(p.cmdline())[:200] for p in left])
"""


def test_a_local_start_that_timed_out_is_started_again(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_AGENT)
    marker = tmp_path / "slowed"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "SLOW_AGENT_MARKER": str(marker)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert marker.is_file(), "the first start's agent was slowed"
    lines = out.stdout.splitlines()  # fabric's console lines (warnings included) and the driver's
    assert "warning: the local Ray did not start (The current node timed out during startup" in out.stdout, out.stdout
    assert "answer 42" in lines and "left []" in lines, out.stdout[-2000:]
