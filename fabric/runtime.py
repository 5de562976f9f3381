"""Ray connection, the local head that `fabric up` starts, and Ray job submission.

Token authentication stays on: `fabric up` makes sure a token exists (Ray's default file,
``~/.ray/auth_token``, unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH name another) and every client
here sends it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import ClusterError, UsageError

if TYPE_CHECKING:
    import psutil
    from ray.job_submission import JobSubmissionClient

    from fabric.config import ClusterConfig

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
"""Ray client server (``ray://``) port, Ray's default; a head takes a free one when another process holds it."""
# Ray turns a node address of 127.0.0.1 into the machine's network address (services.resolve_ip_for_localhost)
# and then binds its GCS, raylet, agents and client server on that address or on every interface, unless
# multi-node clusters are off: a Ray whose processes start with this variable binds all of them to 127.0.0.1.
# For Rays that stay on this machine: fabric's own local Ray, and `fabric up` without --node-ip.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK_IPS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
# Ray's upload limit for a working_dir package (GCS_STORAGE_MAX_SIZE, the max gRPC message size).
UPLOAD_LIMIT_BYTES = int(os.environ.get("RAY_max_grpc_message_size", 512 * 1024 * 1024))
# Never uploaded with a job: environments, VCS data, caches and run outputs.
DEFAULT_EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
    "build",
    "dist",
    "runs",
    "mlruns",
    "wandb",
    ".fabric",
]


# --------------------------------------------------------------------------- token authentication


def token_location() -> str:
    """Where this process takes its Ray token from, in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(default_token_path())


def default_token_path() -> Path:
    """Ray's default token file."""
    return Path.home() / ".ray" / "auth_token"


def token_available() -> bool:
    """True when a token is set in the environment or present in a file Ray reads."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else default_token_path().is_file()


def ensure_token() -> str:
    """Make sure a token exists (generate Ray's default one if none) and return where it is."""
    if not token_available():
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            missing = os.environ["RAY_AUTH_TOKEN_PATH"]
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH points to {missing}, which does not exist")
        proc = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], capture_output=True, text=True)
        if proc.returncode != 0 or not default_token_path().is_file():
            raise ClusterError(f"could not generate a Ray auth token: {proc.stderr.strip()[-500:]}")
    return token_location()


def use_token_auth() -> None:
    """Have Ray clients in this process (and its children) send the token, when one is available.

    Ray's clients only attach the token when RAY_AUTH_MODE=token, so set it unless the user chose a mode.
    """
    if "RAY_AUTH_MODE" in os.environ or not token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        # Ray caches the mode when it is imported; refresh that cache so this process sends the token too.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def auth_headers() -> dict[str, str]:
    """HTTP headers carrying the token for the dashboard's REST API."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        token = os.environ["RAY_AUTH_TOKEN"]
    else:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path())
        if not path.is_file():
            return {}
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- connecting from a stage


def connect(cluster: ClusterConfig | None = None, **init_kwargs: Any) -> None:
    """Connect this process to Ray once: the configured address, the job's cluster, or a local Ray.

    Inside a Ray job (RAY_ADDRESS is set by the job supervisor) the job's cluster is used whatever
    ``cluster.address`` says, so the same config runs on a laptop and on a cluster.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, **init_kwargs}
    address = os.environ.get("RAY_ADDRESS") or (cluster.address if cluster else None)
    if address:
        # An existing cluster: send the token. (A new local Ray turns token auth on by itself.)
        use_token_auth()
        with init_context(address):
            ray.init(address=address, **kwargs)
        return
    if cluster is not None:
        for key in ("num_cpus", "num_gpus", "object_store_memory"):
            value = getattr(cluster, key)
            if value is not None:
                kwargs.setdefault(key, value)
    if "include_dashboard" not in init_kwargs:
        # A new local Ray gets its dashboard on loopback (a free port: never another Ray's 8265): Serve's REST API,
        # which deploys fabric's apps, lives there, and so do Ray's own pages for a developer.
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port())
    with loopback_ray():
        start_local_ray(**kwargs)


LOCAL_START_TRIES = 2
_START_TIMED_OUT = "timed out during startup"
"""What Ray says (``ray.init``'s exception, ``ray start``'s output) when its raylet gave up waiting for its agents."""


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` of a new local Ray, started once more when its start timed out.

    Ray's raylet waits 15 s for its dashboard agent to report its ports and then gives up (``ray.init`` fails after
    30 s: "The current node timed out during startup"); the agent's imports take longer than that on a machine whose
    cores are busy. The processes the failed start left (GCS, dashboard, reaper) are stopped before the next try.
    """
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # Ray raises a plain Exception for this
            if attempt == LOCAL_START_TRIES or _START_TIMED_OUT not in str(e):
                raise
            stop_processes([p for p in me.children(recursive=True) if p.pid not in before], grace_s=5.0)
            log.warning(f"the local Ray did not start ({e}); starting it again")


def init_context(address: str | None) -> contextlib.AbstractContextManager[None]:
    """What ``ray.init(address)`` runs in: :func:`loopback_ray` for a new local Ray (None) and for a GCS address
    on loopback (which Ray would otherwise turn into the machine's network address, where a loopback Ray does
    not listen); nothing for any other address."""
    host = address.rpartition(":")[0].strip("[]") if address and "://" not in address else ""
    try:
        loopback = address is None or ipaddress.ip_address(host).is_loopback
    except ValueError:  # "auto", a host name
        loopback = host == "localhost"
    return loopback_ray() if loopback else contextlib.nullcontext()


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """Within it, a Ray started by this process listens on 127.0.0.1 only (see LOOPBACK_ENV).

    The variable is in the environment the new Ray's processes inherit, and in the constant this process's Ray
    read at import (it picks the node address); both are restored after, so a later connection elsewhere
    is unaffected.
    """
    saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    cached = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = cached  # type: ignore[attr-defined]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- the local head


def fabric_home() -> Path:
    """fabric's state folder: FABRIC_HOME, else ~/.fabric."""
    return Path(os.environ.get("FABRIC_HOME") or Path.home() / ".fabric")


@dataclass
class LocalHead:
    """What `fabric up` started, saved so that `fabric down` stops exactly that."""

    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_location: str
    started_at: float
    node_ip: str = "127.0.0.1"
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources the head declares (``--resources``)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables set for the head's processes beyond the token mode and PATH (e.g. Serve's fast path)."""
    local_only: bool = False
    """A development head (no node address given): every port on 127.0.0.1, no other node can join."""
    redis: str | None = None
    """GCS fault tolerance: the external Redis (``host:port``) the GCS keeps the cluster's state in."""
    storage_namespace: str | None = None
    """The key namespace of this head's state in that Redis (one per `fabric up`)."""
    supervisor_pid: int | None = None
    """The process that restarts the GCS when it dies (:func:`supervise_gcs`), with ``redis``."""
    client_port: int = DEFAULT_CLIENT_PORT
    """The Ray client server's port (``ray://<node_ip>:<client_port>``)."""


def _state_file() -> Path:
    return fabric_home() / "head.json"


def _ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def read_head() -> LocalHead | None:
    """The head recorded by `fabric up`, or None."""
    path = _state_file()
    if not path.is_file():
        return None
    try:
        return LocalHead(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def _client_server_of(cmd: list[str], gcs_port: int) -> bool:
    """True for the command line of a Ray client server attached to the GCS on ``gcs_port`` of this machine.

    `ray start --head` starts it detached and without the temp dir on its command line; its ``--address`` is the
    head's GCS, a port only one process on the machine can hold.
    """
    if "ray.util.client.server" not in cmd:
        return False
    for part in cmd:
        if part.startswith("--address="):
            host, _, port = part.removeprefix("--address=").rpartition(":")
            if port != str(gcs_port):
                return False
            try:
                return host in local_addresses() or ipaddress.ip_address(host).is_loopback
            except ValueError:  # a host name
                return False
    return False


def head_processes(temp_dir: str, gcs_port: int | None = None) -> list[psutil.Process]:
    """Every live process of the head whose Ray temp dir is ``temp_dir``, with their workers and children
    (HAProxy included), and with ``gcs_port`` its Ray client server."""
    import psutil

    roots: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(temp_dir in part for part in cmd) or (gcs_port is not None and _client_server_of(cmd, gcs_port)):
            roots.append(proc)
    seen: dict[int, psutil.Process] = {}
    for proc in roots:
        seen[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                seen[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return [p for p in seen.values() if p.pid != os.getpid()]


def free_port() -> int:
    """A TCP port free on every address of this machine now, for a listener started a moment later.

    Picked below the kernel's ephemeral range, from which Ray's processes (and every other ``bind(0)``) take
    ports while a cluster starts, and above Ray's worker ports (10002-19999), so that nothing else is handed it
    in between. A port handed out is claimed for :data:`PORT_CLAIM_S` (a file per port, shared by this user's
    processes), so two processes picking ports for servers that bind later never get the same one. Falls back
    to a port of the kernel's choosing.
    """
    import random
    import socket

    candidates = list(_port_span())
    # The system's randomness, not the `random` module's: a process that seeded it (a training run does) would
    # otherwise draw the same ports as another process seeded alike, and two servers would collide.
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 64)):
        if port_is_free(port) and _claim(port):
            return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's ephemeral port range (where ``bind(0)`` takes ports from)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _port_span() -> range:
    """The ports :func:`free_port` hands out: from 20000 (above Ray's worker ports) to the kernel's ephemeral range."""
    return range(20000, max(20000, _ephemeral_ports()[0]))


def free_port_range(size: int = 50) -> int | None:
    """The first of ``size`` consecutive ports on which nothing listens, for a server that allocates its own ports
    from a range (Ray Serve's replicas). Taken above the kernel's ephemeral range (61000-65535 by default), where
    neither ``bind(0)`` nor :func:`free_port` hands out ports, and claimed port by port as :func:`free_port` claims
    one. Ranges are aligned to ``size``, so two are the same or disjoint, and a range in use has its servers
    listening in it. None when no whole range is free.
    """
    import random

    start = _ephemeral_ports()[1] + 1
    first = -(-start // size) * size
    bases = list(range(first, 65536 - size + 1, size))
    for base in random.SystemRandom().sample(bases, len(bases)):
        ports = range(base, base + size)
        if not all(port_is_free(port) for port in ports):
            continue
        claimed = []
        for port in ports:
            if not _claim(port):
                break
            claimed.append(port)
        else:
            return base
        for port in claimed:  # another process holds part of it: give the rest back
            _unclaim(port)
    return None


PORT_CLAIM_S = 600.0
"""How long a port :func:`free_port` handed out stays claimed (its listener is up long before)."""


def _claim(port: int) -> bool:
    """Claim ``port`` for this process; False when another process claimed it within :data:`PORT_CLAIM_S`."""
    import time

    marker = _claim_marker(port)
    try:
        if time.time() - marker.stat().st_mtime < PORT_CLAIM_S:
            return False
        marker.unlink()  # an old claim
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one claimant wins
    except FileExistsError:
        return False
    return True


def _unclaim(port: int) -> None:
    _claim_marker(port).unlink(missing_ok=True)


def _claim_marker(port: int) -> Path:
    """The file whose creation claims ``port`` (shared by this user's processes)."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"fabric-ports-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    return folder / str(port)


def port_is_free(port: int) -> bool:
    """True when no process on this machine listens on TCP ``port`` on any address."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # the wildcard: taken on any address (a node IP included) fails here
        except OSError:
            return False
    return True


def reachable(address: str, timeout_s: float = 3.0) -> bool:
    """True when something accepts TCP connections at ``address`` (``host:port``; no host: 127.0.0.1)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def job_api_ready(url: str, timeout: float = 2.0) -> bool:
    """True when the dashboard at ``url`` answers and a node's dashboard agent has reported to it."""
    try:
        req = urllib.request.Request(f"{url}/nodes?view=summary", headers=auth_headers())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            nodes = json.load(resp).get("data", {}).get("summary", [])
    except (OSError, ValueError):
        return False
    return any(n.get("agent") for n in nodes)


def running_head() -> LocalHead | None:
    """The head `fabric up` started, if its processes are still running."""
    head = read_head()
    if head is None:
        return None
    if not head_processes(head.temp_dir):
        return None
    return head


def gcs_port(head: LocalHead) -> int:
    """The head's GCS port."""
    return int(head.gcs_address.rpartition(":")[2])


def process_label(proc: psutil.Process) -> str:
    """A short name for a Ray process: ``gcs_server``, ``raylet``, ``dashboard``, ``ray-client-server``,
    ``DashboardAgent`` (from ``ray::DashboardAgent``), ``haproxy``..."""
    import psutil

    try:
        name = proc.name()
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if name.startswith("ray::"):
        return name[5:]
    if "ray.util.client.server" in cmd:
        return "ray-client-server"
    scripts = [Path(part).stem for part in cmd[1:] if part.endswith(".py")]
    return scripts[0] if name.startswith("python") and scripts else name


def listeners(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """The TCP sockets ``procs`` listen on: (address, port, process label), sorted; IPv4-mapped addresses
    read as IPv4 (``::ffff:127.0.0.1`` -> ``127.0.0.1``)."""
    import psutil

    out: set[tuple[str, int, str]] = set()
    for proc in procs:
        try:
            conns = proc.net_connections("tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.add((c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, process_label(proc)))
    return sorted(out)


def head_listeners(head: LocalHead) -> list[tuple[str, int, str]]:
    """What the processes of ``head`` listen on now."""
    return listeners(head_processes(head.temp_dir, gcs_port(head)))


def local_addresses() -> set[str]:
    """The IPv4 and IPv6 addresses assigned to this machine's interfaces (loopback included)."""
    import psutil

    families = ("AF_INET", "AF_INET6")
    return {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic if a.family.name in families}


def check_node_ip(node_ip: str) -> str:
    """``node_ip`` when it is an IP address of this machine; UsageError otherwise (Ray would hang on it)."""
    try:
        ipaddress.ip_address(node_ip)
    except ValueError:
        raise UsageError(f"--node-ip: {node_ip!r} is not an IP address") from None
    have = local_addresses()
    # The whole 127.0.0.0/8 block answers on the loopback interface, though only 127.0.0.1 is listed.
    if node_ip not in have and not ipaddress.ip_address(node_ip).is_loopback:
        listed = ", ".join(sorted(have))
        raise UsageError(f"--node-ip: {node_ip} is not an address of this machine (its addresses: {listed})")
    return node_ip


def check_resources(resources: object) -> dict[str, float]:
    """Validate custom node resources: a mapping of names to non-negative numbers, CPU/GPU/memory excluded."""
    if not isinstance(resources, dict):
        raise UsageError(f'--resources: expected a JSON object such as {{"head_node": 1}}, got {resources!r}')
    out: dict[str, float] = {}
    for name, value in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise UsageError(f"--resources: {name!r} is set with its own option (--num-cpus, --num-gpus, ...)")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UsageError(f"--resources: {name!r} must be a non-negative number, got {value!r}")
        out[str(name)] = value
    return out


def join_command(head: LocalHead, worker_ip: str = "<worker ip>") -> str:
    """The shell command that joins a worker node to ``head`` with token authentication.

    The token itself is not part of it (it would land in shell history and logs): the worker reads
    ``~/.ray/auth_token`` or RAY_AUTH_TOKEN, copied from this head.
    """
    return (
        f"RAY_AUTH_MODE=token ray start --address={head.gcs_address} --node-ip-address={worker_ip} "
        "--disable-usage-stats"
    )


def start_head(
    *,
    port: int = DEFAULT_GCS_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    node_ip: str | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    redis: str | None = None,
    timeout_s: float = 60.0,
) -> tuple[LocalHead, bool]:
    """Start a local Ray head with token auth, dashboard and job API on 127.0.0.1.

    Args:
        port: the GCS port workers join (``ray start --address <node_ip>:<port>``).
        dashboard_port: dashboard and job API port (always bound to 127.0.0.1).
        num_cpus: CPUs the head declares (None: all).
        num_gpus: GPUs the head declares (None: detected).
        object_store_memory: object store size in bytes (None: Ray's default).
        node_ip: the address other nodes reach this head on (Ray's own binds: that address or every
            interface). None: a development head, which binds every port to 127.0.0.1 (LOOPBACK_ENV).
        resources: custom resources the head declares, e.g. ``{"head_node": 1}``.
        env: extra environment variables for the head's processes (read by Ray when they start).
        redis: ``host:port`` of a Redis: GCS fault tolerance. The GCS keeps the cluster's state there (under a
            namespace of its own; REDIS_PASSWORD, when set, is Redis's password) and a supervisor process
            restarts the GCS when it dies (:func:`supervise_gcs`).
        timeout_s: how long to wait for the job API.

    Returns:
        The head and whether it was started now (False: it was already running).

    Raises:
        UsageError: ``node_ip`` is not an address of this machine, ``resources`` is malformed, or no Redis
            answers at ``redis``.
        ClusterError: Ray failed to start or its job API did not come up.
    """
    head = running_head()
    if head is not None:
        return head, False
    local_only = node_ip is None
    node_ip = check_node_ip(node_ip or "127.0.0.1")
    resources = check_resources(resources or {})
    if redis is not None:
        redis = check_redis(redis)
    location = ensure_token()
    home = fabric_home()
    home.mkdir(parents=True, exist_ok=True)
    # A short, fabric-owned temp dir: Ray's socket paths must stay under the OS limit, and every head
    # process carries it on its command line, which is how `fabric down` finds them and only them.
    temp_dir = f"/tmp/fabric-{os.getuid()}-{port}"
    client_port = DEFAULT_CLIENT_PORT if port_is_free(DEFAULT_CLIENT_PORT) else free_port()
    cmd = [
        _ray_bin(), "start", "--head",
        f"--port={port}",
        f"--node-ip-address={node_ip}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        # Ray's fixed default (52365) clashes with any other Ray on the machine, and the job API needs
        # this agent: take a free port instead.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={client_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if object_store_memory is not None:
        cmd.append(f"--object-store-memory={object_store_memory}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    # A job's `python ...` entrypoint resolves through the head's PATH: make it this environment's Python.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    extra = dict(env or {})
    proc_env = {**os.environ, **extra, "RAY_AUTH_MODE": "token", "PATH": path}
    if local_only:
        proc_env.update(LOOPBACK_ENV)
    namespace = None
    if redis is not None:
        # Ray's GCS fault tolerance (``ray start`` reads these): the GCS stores its tables in this Redis under
        # the namespace, and a GCS started again with the same ones reloads them.
        namespace = f"fabric-{port}-{uuid.uuid4().hex[:12]}"
        proc_env.update({"RAY_REDIS_ADDRESS": redis, "RAY_external_storage_namespace": namespace})
        if os.environ.get("REDIS_PASSWORD"):
            cmd.append(f"--redis-password={os.environ['REDIS_PASSWORD']}")
    for attempt in range(1, LOCAL_START_TRIES + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=proc_env, timeout=timeout_s + 60)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or attempt == LOCAL_START_TRIES or _START_TIMED_OUT not in output:
            break
        # as in start_local_ray: the raylet gave up waiting for its dashboard agent (a busy machine)
        stop_processes(head_processes(temp_dir, port), grace_s=5.0)
        log.warning("the Ray head did not start (its node timed out during startup); starting it again")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ClusterError(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
    head = LocalHead(
        gcs_address=f"{node_ip}:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        temp_dir=temp_dir,
        token_location=location,
        started_at=time.time(),
        node_ip=node_ip,
        resources=resources,
        env=extra,
        local_only=local_only,
        redis=redis,
        storage_namespace=namespace,
        client_port=client_port,
    )
    deadline = time.monotonic() + timeout_s
    # Jobs are accepted once the head's dashboard agent has reported in, which can trail the dashboard; the
    # client server, which `ray start` does not wait for, can trail both.
    waits = {
        f"the job API on {head.dashboard_url}": lambda: job_api_ready(head.dashboard_url),
        f"the Ray client server on {node_ip}:{client_port}": lambda: reachable(f"{node_ip}:{client_port}", 1.0),
    }
    for what, ready in waits.items():
        while not ready():
            if time.monotonic() > deadline:
                stop_processes(head_processes(temp_dir, port))
                raise ClusterError(f"{what} was not ready within {timeout_s:.0f}s")
            time.sleep(0.5)
    if redis is not None:
        head.supervisor_pid = _start_supervisor(temp_dir)
    _state_file().write_text(json.dumps(asdict(head), indent=2))
    return head, True


def check_redis(address: str, timeout_s: float = 5.0) -> str:
    """``address`` (``host:port``, a ``redis://`` prefix allowed) when a Redis answers there; UsageError otherwise."""
    import socket

    address = address.removeprefix("redis://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--redis: expected HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as e:
        raise UsageError(f"--redis: no Redis answers at {address} ({e})") from None
    if not reply.startswith((b"+PONG", b"-NOAUTH")):  # -NOAUTH: one with a password (REDIS_PASSWORD)
        raise UsageError(f"--redis: {address} answered {reply[:40]!r}, not as a Redis")
    return address


def _start_supervisor(temp_dir: str) -> int:
    """Start the GCS supervisor (:func:`supervise_gcs`) for the head in ``temp_dir``, detached; its log is
    ``<FABRIC_HOME>/gcs-supervisor.log``."""
    log_path = fabric_home() / "gcs-supervisor.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fabric.runtime", "supervise-gcs", f"--temp-dir={temp_dir}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return proc.pid


def stop_processes(procs: list[psutil.Process], grace_s: float = 10.0) -> int:
    """SIGTERM ``procs``, SIGKILL what is left after ``grace_s``; returns how many were signalled."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def _cmdline(proc: psutil.Process) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def stop_head() -> int:
    """Stop the head `fabric up` started (only its processes); returns how many processes stopped."""
    head = read_head()
    if head is None:
        return 0
    count = 0
    # First the GCS supervisor, which would otherwise start the GCS again as the head stops.
    supervisor = [p for p in head_processes(head.temp_dir) if "supervise-gcs" in _cmdline(p)]
    count += stop_processes(supervisor)
    # Workers can be forked while we stop the parents: sweep until nothing of ours is left.
    for _ in range(5):
        procs = head_processes(head.temp_dir, gcs_port(head))
        if not procs:
            break
        count += stop_processes(procs)
    _state_file().unlink(missing_ok=True)
    return count


# --------------------------------------------------------------------------- the GCS supervisor (`fabric up --redis`)
#
# With an external Redis a restarted GCS reloads the cluster's state from it, and the raylets, actors and Serve
# replicas, which keep running meanwhile, reconnect to it. On Kubernetes KubeRay restarts the head container; on
# a machine of one's own nothing restarts a dead ``gcs_server``, so `fabric up --redis` starts
# ``python -m fabric.runtime supervise-gcs --temp-dir DIR`` beside the head. It watches the head's
# ``gcs_server`` and, when that is gone while the head's raylet still runs, starts it again with the exact
# command line, environment and working directory it had (Ray's GCS takes everything, its log files included,
# from its arguments). It exits when the head's raylet is gone (`fabric down` stops it first; `ray stop`).

_supervisor_log = logging.getLogger("fabric.runtime.supervisor")

# A head being stopped loses its GCS a moment before its raylet: wait this long before deciding the GCS died
# alone (and restarting it).
GCS_SETTLE_S = 1.0


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


def _launch_of(proc: psutil.Process) -> GcsLaunch:
    """The command line, environment and working directory of a running process."""
    return GcsLaunch(cmdline=proc.cmdline(), env=proc.environ(), cwd=proc.cwd())


def _restart_gcs(launch: GcsLaunch) -> int:
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


def _alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs (a dead child of this process, a zombie until reaped, is reaped and not alive)."""
    import psutil

    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return proc.is_running()
        proc.wait(timeout=0)  # reaps it when it is our child (a GCS this supervisor restarted)
    except (psutil.Error, psutil.TimeoutExpired):
        pass
    return False


def supervise_gcs(temp_dir: str, interval_s: float = 0.5) -> int:
    """Watch the head's GCS until its raylet is gone; returns how many times the GCS was restarted."""
    import psutil

    raylet = head_process(temp_dir, "raylet")
    gcs = head_process(temp_dir, "gcs_server")
    if raylet is None or gcs is None:
        _supervisor_log.error("no running head with temp dir %s (raylet %s, gcs_server %s)", temp_dir, raylet, gcs)
        return 0
    launch = _launch_of(gcs)
    restarts = 0
    while _alive(raylet):
        if not _alive(gcs):
            time.sleep(GCS_SETTLE_S)
            if not _alive(raylet):
                break
            found = head_process(temp_dir, "gcs_server")  # someone else may have started it meanwhile
            if found is None:
                pid = _restart_gcs(launch)
                restarts += 1
                _supervisor_log.warning(
                    "the GCS of %s died; restarted it with its command line (pid %d)", temp_dir, pid
                )
                found = psutil.Process(pid)
            gcs = found
        time.sleep(interval_s)
    _supervisor_log.info(
        "the head's raylet is gone (the head was stopped): exiting after %d GCS restart(s)", restarts
    )
    return restarts


def supervisor_main(argv: list[str] | None = None) -> int:
    """``python -m fabric.runtime supervise-gcs --temp-dir DIR``: run :func:`supervise_gcs`, logging to stderr."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fabric.runtime", description="restart a `fabric up` head's dead GCS"
    )
    p.add_argument("command", choices=["supervise-gcs"])
    p.add_argument("--temp-dir", required=True, help="the head's Ray temp dir (on each head process's command line)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between checks (default %(default)s)")
    args = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("fabric").handlers = [handler]  # a daemon's log: timestamps, on stderr
    supervise_gcs(args.temp_dir, args.interval)
    return 0


# --------------------------------------------------------------------------- jobs


def default_job_address() -> str:
    """The Job API address: RAY_API_SERVER_ADDRESS, RAY_ADDRESS (http), `fabric up`'s head, or :8265."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    head = read_head()
    return head.dashboard_url if head else f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"


def job_client(address: str | None = None) -> JobSubmissionClient:
    """A Job Submission API client that sends the auth token; ClusterError when unreachable."""
    use_token_auth()
    from ray.job_submission import JobSubmissionClient

    url = address or default_job_address()
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # Ray raises ConnectionError, AuthenticationError, RuntimeError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot reach the Ray job API at {url}: {first}") from None


def _excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        if "/" in pat.strip("/"):
            if fnmatch.fnmatch(rel, pat.strip("/")) or rel.startswith(pat.strip("/") + "/"):
                return True
        elif any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def walk_working_dir(root: Path, excludes: list[str]) -> Iterator[tuple[str, int]]:
    """Yield (relative path, size) of every file a job upload of ``root`` would carry."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not _excluded(rel_dir + d, excludes)]
        for name in filenames:
            rel = rel_dir + name
            if _excluded(rel, excludes):
                continue
            try:
                yield rel, (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_working_dir(root: Path, excludes: list[str], limit: int = UPLOAD_LIMIT_BYTES) -> int:
    """Return the upload size of ``root``; UsageError naming the biggest entries when over ``limit``."""
    sizes: dict[str, int] = {}
    total = 0
    for rel, size in walk_working_dir(root, excludes):
        total += size
        top = rel.split("/", 1)[0]
        sizes[top] = sizes.get(top, 0) + size
    if total > limit:
        biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        listing = ", ".join(f"{name} ({human_bytes(size)})" for name, size in biggest)
        raise UsageError(
            f"working_dir {root} is {human_bytes(total)}, over Ray's upload limit of {human_bytes(limit)}; "
            f"largest entries: {listing}. Exclude them with --exclude NAME or read large data from a URI"
        )
    return total


if __name__ == "__main__":
    sys.exit(supervisor_main())
