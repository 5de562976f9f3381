"""Upload-size check, excludes, job entrypoints, and `fabric up`'s option checks (no Ray)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from fabric.cli.stage import job_main
from fabric.errors import UsageError
from fabric.runtime import (
    DEFAULT_EXCLUDES,
    LocalHead,
    check_node_ip,
    check_redis,
    check_resources,
    check_working_dir,
    join_command,
    walk_working_dir,
)


def _tree(root: Path) -> None:
    for rel, size in {
        "jobs/train.py": 100,
        "fabric/x.py": 200,
        ".venv/lib/big.so": 5000,
        ".git/objects/pack": 4000,
        "runs/smoke/model.pt": 3000,
        "fabric/__pycache__/x.cpython-311.pyc": 300,
        "data/big.parquet": 10_000,
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"0" * size)


def test_upload_leaves_out_envs_vcs_caches_and_run_outputs(tmp_path: Path) -> None:
    _tree(tmp_path)
    files = dict(walk_working_dir(tmp_path, DEFAULT_EXCLUDES))
    assert set(files) == {"jobs/train.py", "fabric/x.py", "data/big.parquet"}
    files = dict(walk_working_dir(tmp_path, [*DEFAULT_EXCLUDES, "data/"]))
    assert set(files) == {"jobs/train.py", "fabric/x.py"}


def test_oversized_upload_names_what_to_exclude(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert check_working_dir(tmp_path, DEFAULT_EXCLUDES, limit=20_000) == 10_300
    with pytest.raises(UsageError) as info:
        check_working_dir(tmp_path, DEFAULT_EXCLUDES, limit=1000)
    msg = str(info.value)
    assert "data (9.8 KiB)" in msg and "--exclude" in msg


def test_job_main_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def stage(cfg: object) -> None:
        seen.append(cfg)

    assert job_main(stage, ["train.epochs=3"]) == 0
    assert seen[0].train.epochs == 3  # type: ignore[attr-defined]
    assert job_main(stage, ["train.epochs=0"]) == 2
    assert "train.epochs" in capsys.readouterr().err

    def failing(cfg: object) -> None:
        from fabric.errors import DataValidationError

        raise DataValidationError("column 'age' has 3 nulls", column="age", rows=3)

    assert job_main(failing, []) == 1
    err = capsys.readouterr().err
    assert "DataValidationError: column 'age' has 3 nulls" in err and "Traceback" not in err


def test_custom_resources_are_checked_one_problem_at_a_time() -> None:
    assert check_resources({"head_node": 1, "ssd": 0.5}) == {"head_node": 1, "ssd": 0.5}
    for bad, words in [
        ([1], "expected a JSON object"),
        ({"CPU": 2}, "'CPU' is set with its own option"),
        ({"gpu_slots": -1}, "'gpu_slots' must be a non-negative number"),
        ({"flag": True}, "'flag' must be a non-negative number"),
        ({"name": "one"}, "'name' must be a non-negative number"),
    ]:
        with pytest.raises(UsageError, match=words):
            check_resources(bad)


def test_node_ip_must_be_an_address_of_this_machine() -> None:
    assert check_node_ip("127.0.0.1") == "127.0.0.1"
    assert check_node_ip("127.0.0.2") == "127.0.0.2"  # the loopback block answers on lo
    with pytest.raises(UsageError, match="not an IP address"):
        check_node_ip("head.local")
    with pytest.raises(UsageError, match="not an address of this machine"):
        check_node_ip("203.0.113.77")  # TEST-NET-3: never assigned to a real interface


def test_join_command_targets_the_head_with_token_auth_and_no_secret() -> None:
    head = LocalHead("10.0.0.1:6379", "http://127.0.0.1:8265", "/tmp/x", "/root/.ray/auth_token", 0.0, "10.0.0.1")
    cmd = join_command(head, "10.0.0.2")
    assert cmd.startswith("RAY_AUTH_MODE=token ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2")
    assert "RAY_AUTH_TOKEN=" not in cmd


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resources", "{x"], "--resources: not valid JSON"),
        (["--resources", '{"GPU": 1}'], "'GPU' is set with its own option"),
        (["--node-ip", "203.0.113.77"], "--node-ip: 203.0.113.77 is not an address of this machine"),
        (["--num-cpus", "-1"], "--num-cpus must be 0 or more"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
    ],
)
def test_up_refuses_bad_options_with_one_line_and_starts_nothing(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric.cli import main

    monkeypatch.setenv("FABRIC_HOME", str(tmp_path))
    assert main(["up", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "head.json").exists()


def test_free_ports_stay_out_of_the_ranges_others_take_ports_from() -> None:
    """HAProxy's side ports come from here: one that bind(0) could hand to a Ray process would make it fail."""
    import socket

    from fabric.runtime import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as sock:
        sock.bind(("", ports.pop()))  # free on every address, not only on 127.0.0.1


def test_processes_picking_ports_at_once_never_get_the_same_one() -> None:
    """Servers bind their port a while after it was picked (a Serve app: seconds): two pytest-xdist workers (or
    two of a user's commands) picking meanwhile must not be handed the same port, which listeners sharing it
    through SO_REUSEPORT would both bind. 3 x 150 picks from ~12,000 ports would repeat one almost surely."""
    import subprocess
    import sys

    pick = "from fabric.runtime import free_port; print(*[free_port() for _ in range(150)])"
    procs = [subprocess.Popen([sys.executable, "-c", pick], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    ports = [int(p) for proc in procs for p in proc.communicate(timeout=120)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(ports) == 450 and len(set(ports)) == 450


def test_port_ranges_are_aligned_disjoint_free_and_apart_from_free_ports() -> None:
    """Each fast-path Serve started here allocates its replicas' ports from a range of its own: two Serves sharing
    one would answer for each other's apps when a replica is replaced (HAProxy forwards to the old port)."""
    from fabric.runtime import free_port, free_port_range
    from fabric.serve.spec import DIRECT_INGRESS_RANGE_VARS, fast_path_ports_env

    claims = Path(tempfile.gettempdir()) / f"fabric-ports-{os.getuid()}"
    high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    low_var, high_var = DIRECT_INGRESS_RANGE_VARS
    env = fast_path_ports_env()
    got = [free_port_range(50), free_port_range(50), int(env[low_var])]
    try:
        assert None not in got and len(set(got)) == 3 and int(env[high_var]) == got[2] + 49
        assert all(b % 50 == 0 and high < b and b + 50 <= 65536 for b in got)  # type: ignore[operator]
        assert all(p < high for p in (free_port() for _ in range(50)))
        busy = got[0]
        with socket.socket() as held:  # a range where something listens is not handed out, claimed or not
            held.bind(("", busy + 7))  # type: ignore[operator]
            held.listen()
            for p in range(busy, busy + 50):  # type: ignore[arg-type, operator]
                (claims / str(p)).unlink()  # as if its claims had expired
            more = [free_port_range(50) for _ in range(5)]
            got.extend(more)
            assert busy not in more
    finally:  # give the ranges back: Serves of other tests need them
        for base in filter(None, got):
            for p in range(base, base + 50):
                (claims / str(p)).unlink(missing_ok=True)


def test_a_new_local_ray_or_a_loopback_address_resolves_to_loopback() -> None:
    """Ray turns 127.0.0.1 into the machine's address unless clusters are off: within init_context they are, and
    only for a new local Ray or a loopback GCS address; the process's environment and Ray's constant come back."""
    import os

    import ray._private.ray_constants as constants
    from ray._private.services import resolve_ip_for_localhost

    from fabric.runtime import LOOPBACK_ENV, init_context

    before = (dict(os.environ), constants.ENABLE_RAY_CLUSTER)
    for address in (None, "127.0.0.1:6379", "localhost:6379", "[::1]:6379"):
        with init_context(address):
            assert resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
            assert all(os.environ.get(k) == v for k, v in LOOPBACK_ENV.items())
        assert (dict(os.environ), constants.ENABLE_RAY_CLUSTER) == before
    for address in ("10.0.0.1:6379", "auto", "ray://10.0.0.1:10001", "head.local:6379"):
        with init_context(address):  # untouched
            assert (dict(os.environ), constants.ENABLE_RAY_CLUSTER) == before


def test_the_client_server_of_our_gcs_port_is_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import runtime

    monkeypatch.setattr(runtime, "local_addresses", lambda: {"127.0.0.1", "192.0.2.2"})
    ours = ["python", "-m", "ray.util.client.server", "--address=192.0.2.2:6390", "--host=192.0.2.2", "--port=10001"]
    assert runtime._client_server_of(ours, 6390)
    assert runtime._client_server_of([*ours[:3], "--address=127.0.0.1:6390"], 6390)
    assert not runtime._client_server_of(ours, 6379)  # another head's
    assert not runtime._client_server_of([*ours[:3], "--address=203.0.113.7:6390"], 6390)  # another machine's GCS
    assert not runtime._client_server_of(["python", "worker.py", "--address=127.0.0.1:6390"], 6390)


def test_listeners_and_what_up_prints_about_them() -> None:
    import os
    import socket

    import psutil

    from fabric.cli.up import listening_lines
    from fabric.runtime import listeners

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = listeners([psutil.Process(os.getpid())])
    assert [(ip, p) for ip, p, _ in found if p == port] == [("127.0.0.1", port)]
    local = listening_lines([("127.0.0.1", 6390, "gcs_server"), ("127.0.0.1", 8275, "dashboard")])
    assert "127.0.0.1        6390 gcs_server, 8275 dashboard" in local and "every port is on loopback" in local
    mixed = listening_lines([("127.0.0.1", 8275, "dashboard"), ("::", 6390, "gcs_server")])
    assert ":: (every interface) 6390 gcs_server" in mixed and "reachable from other machines on: ::" in mixed
    assert "every port is on loopback" not in mixed


def _answering(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A one-connection TCP server on 127.0.0.1 that answers ``reply`` to whatever it reads."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_redis_address_is_checked_by_asking_it() -> None:
    from fabric.runtime import free_port

    for reply, ok in ((b"+PONG\r\n", True), (b"-NOAUTH Authentication required.\r\n", True), (b"HTTP/1.1 400", False)):
        server, thread = _answering(reply)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        try:
            if ok:
                assert check_redis(f"redis://{address}") == address
            else:
                with pytest.raises(UsageError, match="not as a Redis"):
                    check_redis(address)
        finally:
            thread.join(timeout=10)
            server.close()
    with pytest.raises(UsageError, match="no Redis answers at 127.0.0.1:"):
        check_redis(f"127.0.0.1:{free_port()}")
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        check_redis("localhost")


def test_a_head_recorded_before_fault_tolerance_existed_still_loads() -> None:
    head = LocalHead(gcs_address="127.0.0.1:6379", dashboard_url="u", temp_dir="t", token_location="x", started_at=0)
    assert head.redis is None and head.supervisor_pid is None
