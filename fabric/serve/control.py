"""Driver side: start Serve on the fast path, deploy the app, change its traffic at run time, report status.

The app is always deployed declaratively (``import_path`` + ``args``, as ``serve deploy`` and ``serve run
<yaml>`` do), so that a traffic change is a *lightweight* config update: only the deployment's
``user_config`` changes, and Serve calls ``reconfigure`` on the live replicas instead of replacing them;
requests in flight finish undisturbed.

Only public Serve interfaces: ``serve.start``/``status``/``delete`` and Serve's REST API on Ray's dashboard
(``GET``/``PUT /api/serve/applications/``, what ``serve deploy`` and ``fabric status`` use), whose
``PUT`` replaces the whole set of declarative apps. A local Ray started here therefore runs the dashboard
(on 127.0.0.1).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from fabric.errors import ClusterError, UsageError
from fabric.serve.spec import (
    DEPLOYMENT,
    IMPORT_PATH,
    app_config,
    fast_path_env,
    fast_path_ports_env,
    model_name,
    serving_versions,
    traffic,
)

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

DEPLOY_TIMEOUT_S = 300.0
_DASHBOARDS: dict[str, str] = {}
"""GCS address -> its dashboard's address, looked up once per process."""


@dataclass
class ServeResult:
    """Where the deployed app answers."""

    app_name: str
    url: str
    model_name: str
    traffic: dict[str, float]
    fast_path: bool
    routes: list[str] = field(default_factory=list)


def _state_file() -> Any:
    from fabric.runtime import fabric_home

    return fabric_home() / "serve.json"


def owns_ray(cfg: PipelineConfig) -> bool:
    """True when :func:`connect` would start a local Ray (no address configured, no `fabric up` head)."""
    from fabric import runtime

    return not (os.environ.get("RAY_ADDRESS") or cfg.cluster.address or runtime.running_head())


def clear_state() -> None:
    """Forget the Serve that `fabric serve` recorded (it is shutting down)."""
    _state_file().unlink(missing_ok=True)


def app_running(app: str) -> bool:
    """True while Serve lists ``app`` (False also when Ray is gone)."""
    from ray import serve

    try:
        return app in serve.status().applications
    except Exception:  # the cluster went away
        return False


def connect(cfg: PipelineConfig) -> bool:
    """Connect to Ray, starting a local one with the fast-path environment when none is configured.

    Returns:
        True when the fast-path variables were in the environment of a Ray started here.

    Raises:
        UsageError: before a local Ray starts, a port its Serve would bind (``serve.port``, the side ports) is
            held, naming the process that holds it.
    """
    from fabric import runtime

    # Before `import ray`: Ray reads RAY_AUTH_MODE once, at import, and a driver that imported it in the
    # default mode cannot talk to a local head started with token auth.
    runtime.use_token_auth()
    import ray

    if ray.is_initialized():
        return False
    env = fast_path_env(cfg)
    address = os.environ.get("RAY_ADDRESS") or cfg.cluster.address
    head = None if address else runtime.running_head()
    if head is not None:
        # `fabric up`'s head: the Serve controller gets the variables through controller_options.
        with runtime.init_context(head.gcs_address):
            ray.init(address=head.gcs_address)
        return False
    if not address:
        # A Ray started here inherits this process's environment, controller and proxies included.
        os.environ.update(env)
        if env:
            os.environ.update(fast_path_ports_env())
        # A held port fails now, naming its holder: not after the new Ray's start (seconds), or a pipeline's training.
        check_ports_free(cfg.serve.host, _serve_ports(cfg.serve.port))
    # A new local Ray gets its dashboard on loopback (runtime.connect): Serve's REST API, how apps are deployed here.
    runtime.connect(cfg.cluster)
    return bool(env) and not address


def dashboard_url() -> str:
    """The connected cluster's dashboard (Ray's documented ``ray.init().address_info['webui_url']``)."""
    import ray

    if not ray.is_initialized():
        raise ClusterError("not connected to Ray: connect first (fabric.serve.control.connect or attach)")
    gcs = ray.get_runtime_context().gcs_address
    if gcs not in _DASHBOARDS:
        worker_log = logging.getLogger("ray._private.worker")  # its "Calling ray.init() again" notice is noise here
        level = worker_log.level
        worker_log.setLevel(logging.WARNING)
        try:
            _DASHBOARDS[gcs] = ray.init(ignore_reinit_error=True).address_info.get("webui_url") or ""
        finally:
            worker_log.setLevel(level)
    url = _DASHBOARDS[gcs]
    if not url:
        raise ClusterError(
            "this Ray cluster runs no dashboard, which serves Serve's REST API: start it with the dashboard "
            "(`fabric up`, `ray start --head --include-dashboard=true`, ray.init(include_dashboard=True))"
        )
    return url if "://" in url else f"http://{url}"


DASHBOARD_START_S = 60.0
"""How long a refused connection to the dashboard counts as "still starting"."""


def _rest(method: str, body: dict[str, Any] | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """One call to Serve's REST API (``/api/serve/applications/``) on the dashboard; its JSON answer."""
    from fabric import runtime

    url = f"{dashboard_url()}/api/serve/applications/"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={**runtime.auth_headers(), "Content-Type": "application/json"}
    )
    # The dashboard's HTTP server comes up a moment after ray.init() returns (seconds on a busy machine).
    deadline = time.monotonic() + DASHBOARD_START_S
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                text = resp.read()
            break
        except urllib.error.HTTPError as e:
            reason = e.read().decode(errors="replace").strip()[-2000:]
            raise ClusterError(f"Serve's REST API ({method} {url}) answered {e.code}: {reason}") from None
        except OSError as e:
            if isinstance(getattr(e, "reason", e), ConnectionRefusedError) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise ClusterError(f"Serve's REST API at {url} did not answer ({getattr(e, 'reason', e)})") from None
    return json.loads(text) if text.strip() else {}


def _details() -> dict[str, Any]:
    """Serve's instance details (``ServeInstanceDetails`` as JSON; no controller_info while Serve is not up)."""
    return _rest("GET")


def start(cfg: PipelineConfig) -> dict[str, Any]:
    """Start Serve (or join the running one) with ``cfg.serve``'s host and port and the fast path.

    Returns:
        The HTTP options in effect (a running Serve keeps the ones it started with).
    """
    from ray import serve

    env = fast_path_env(cfg)
    options: dict[str, Any] = {"http_options": {"host": cfg.serve.host, "port": cfg.serve.port}}
    if env:
        options["controller_options"] = {"runtime_env": {"env_vars": env}}
    if not _serve_running() and _ray_on_this_machine():
        check_ports_free(cfg.serve.host, _serve_ports(cfg.serve.port))
    serve.start(**options)
    http = _details().get("http_options") or {}
    return {"host": http.get("host", cfg.serve.host), "port": http.get("port", cfg.serve.port)}


def _serve_running() -> bool:
    return bool(_details().get("controller_info"))


def _ray_on_this_machine() -> bool:
    import ray

    from fabric import runtime

    host = ray.get_runtime_context().gcs_address.rpartition(":")[0]
    return host in runtime.local_addresses() or host.startswith("127.")


def _serve_ports(port: int) -> dict[int, str]:
    """Port -> what Serve would bind there: its HTTP port, and the fast path's side ports (SIDE_PORT_VARS) where set
    for this Ray."""
    from fabric import runtime
    from fabric.serve.spec import SIDE_PORT_VARS

    head = runtime.running_head()
    values = {**os.environ, **(head.env if head else {})}
    ports = {port: "serve.port"}
    for var in SIDE_PORT_VARS:
        if values.get(var, "").isdigit():
            ports[int(values[var])] = var
    return ports


def check_ports_free(host: str, ports: dict[int, str]) -> None:
    """UsageError naming the process that holds one of ``ports`` (port -> its setting) where Serve binds on
    ``host``, instead of HAProxy's "cannot bind socket" alert from inside the proxy actor."""
    import psutil

    for conn in psutil.net_connections("inet"):
        port = conn.laddr.port if conn.laddr else None
        if conn.status != psutil.CONN_LISTEN or port not in ports:
            continue
        bound = conn.laddr.ip.removeprefix("::ffff:")
        if host not in ("0.0.0.0", "::") and bound not in ("0.0.0.0", "::", host):
            continue  # another address: no clash
        raise UsageError(f"{ports[port]}: port {port} on {host} is held by {_describe(conn.pid)}")


def _describe(pid: int | None) -> str:
    import psutil

    if pid is None:
        return "a process this user cannot see (another user's)"
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())[:200] or proc.name()
        orphan = proc.ppid() == 1 and proc.name().startswith("haproxy")
    except psutil.Error:
        return f"process {pid}"
    hint = f"; it is an HAProxy left by a Serve whose Ray is gone: `kill {pid}`" if orphan else ""
    return f"process {pid} ({cmd}){hint}"


def _wait_running(app: str, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        st = serve.status().applications.get(app)
        if st is not None and st.status == ApplicationStatus.RUNNING:
            return
        if st is not None and st.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise ClusterError(f"Serve app {app!r} is {st.status.value}: {st.message.strip()[-2000:]}")
        if time.monotonic() > deadline:
            where = f" (status {st.status.value}: {st.message.strip()[-500:]})" if st else ""
            raise ClusterError(f"Serve app {app!r} was not running after {timeout_s:.0f}s{where}")
        time.sleep(0.2)


def put_app(app: dict[str, Any], ready_url: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy (or update) one declarative Serve app next to the apps already there, and wait until it answers.

    Serve must be started (:func:`start`). Records this Serve as the one ``fabric serve``/``status`` attach to.

    Args:
        app: the app as in a Serve config file (``name``, ``route_prefix``, ``import_path``, ``args``).
        ready_url: a route of the app that answers 200 once it serves.
        timeout_s: how long to wait for the app to run and answer.

    Raises:
        ClusterError: the app failed to deploy (with Serve's reason) or did not answer in time.
    """
    import ray

    details = _running_details()
    apps = _declared(details)
    apps[app["name"]] = app
    # Recorded before the app can answer, so that whoever sees it answering finds the Ray it runs on.
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps({"gcs_address": ray.get_runtime_context().gcs_address, "app": app["name"]}))
    _apply(details, apps)
    _wait_running(app["name"], timeout_s)
    _wait_answering(ready_url, timeout_s)


def _wait_answering(url: str, timeout_s: float) -> None:
    """Wait until ``url`` answers 200 over HTTP: the ingress (HAProxy) learns a new app's route a moment after
    Serve reports it running, and meanwhile sends its requests to another app."""
    import urllib.error
    import urllib.request

    probe = url.replace("://0.0.0.0:", "://127.0.0.1:")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not routed here yet (404 from another app, connection refused)
        if time.monotonic() > deadline:
            raise ClusterError(f"the Serve app is running but {probe} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.2)


def _running_details() -> dict[str, Any]:
    details = _details()
    if not details.get("controller_info"):
        raise ClusterError("Serve is not running on this Ray cluster (start it with fabric.serve.control.start)")
    return details


def _apply(details: dict[str, Any], apps: dict[str, dict[str, Any]]) -> None:
    """PUT the whole declarative config: ``apps`` with the HTTP options and proxy location in effect (Serve
    keeps those of its start; naming others only earns a warning)."""
    from ray.serve.schema import ServeDeploySchema

    body: dict[str, Any] = {"applications": list(apps.values())}
    for key in ("http_options", "proxy_location"):
        if details.get(key) is not None:
            body[key] = details[key]
    try:
        schema = ServeDeploySchema.model_validate(body)
    except ValueError as e:  # pydantic's ValidationError
        raise UsageError(f"invalid Serve config: {e}") from None
    _rest("PUT", schema.model_dump(mode="json", exclude_unset=True))


def _declared(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The declaratively deployed apps, as their config dicts (a PUT replaces the whole set)."""
    apps = details.get("applications") or {}
    return {name: a["deployed_app_config"] for name, a in apps.items() if a.get("deployed_app_config")}


def deploy(cfg: PipelineConfig, timeout_s: float = DEPLOY_TIMEOUT_S) -> ServeResult:
    """Deploy (or update) the app of ``cfg`` and wait until it answers.

    Connects to Ray (a local one with the fast path when no cluster is configured), starts Serve on
    ``serve.host:serve.port``, and deploys ``fabric.serve.app:build_app`` with this config.

    Raises:
        UsageError: a model cannot be found.
        ClusterError: the app failed to deploy (the message carries Serve's reason).
    """
    from fabric.serve.engines import locate

    for version in serving_versions(cfg):
        locate(version, cfg)  # a readable error here rather than a traceback in Serve's status
    started_fast = connect(cfg)
    http = start(cfg)
    url = f"http://{http['host']}:{http['port']}{cfg.serve.route_prefix.rstrip('/')}"
    put_app(app_config(cfg), url + "/v2/health/ready", timeout_s)
    name = model_name(cfg)
    return ServeResult(
        app_name=cfg.serve.app_name,
        url=url,
        model_name=name,
        traffic=traffic(cfg),
        fast_path=started_fast or is_fast_path(),
        routes=[
            f"POST {url}/v2/models/{name}/infer",
            f"GET {url}/v2/models/{name}",
            f"GET {url}/v2/health/ready",
            f"GET {url}/docs",
        ],
    )


def is_fast_path() -> bool:
    """True when the running Serve ingress is HAProxy (the fast path)."""
    from ray.util.state import list_actors

    try:
        proxies = {p.get("actor_id") for p in (_details().get("proxies") or {}).values()}
        alive = [("class_name", "=", "HAProxyManager"), ("state", "=", "ALIVE")]
        haproxy = list_actors(address=dashboard_url(), filters=alive, timeout=10)
    except Exception:  # no Serve, no dashboard
        return False
    return any(a.actor_id in proxies for a in haproxy)


def attach(address: str | None = None) -> None:
    """Connect to the cluster running Serve: ``address``, RAY_ADDRESS, the last ``fabric serve``'s, or
    ``fabric up``'s head."""
    from fabric import runtime

    runtime.use_token_auth()  # before `import ray` (see connect)
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        state = _state_file()
        if state.is_file():
            address = json.loads(state.read_text()).get("gcs_address")
        elif (head := runtime.running_head()) is not None:
            address = head.gcs_address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        raise UsageError("no running Serve found: start one with `fabric serve <config>` or pass --address")
    target = address or os.environ["RAY_ADDRESS"]
    if "://" not in target and target != "auto" and not runtime.reachable(target):
        # ray.init retries an absent GCS for minutes; say so at once instead.
        raise ClusterError(f"no Ray cluster answers at {target} (is `fabric serve` still running?)")
    try:
        with runtime.init_context(target):
            ray.init(address=address, namespace="serve", log_to_driver=False)
    except Exception as e:  # ConnectionError and friends, with Ray's long messages
        raise ClusterError(
            f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')}: {str(e).splitlines()[0]}"
        ) from None


def current_traffic(app: str) -> dict[str, float]:
    """The traffic weights the app's deployment is configured with now."""
    apps = _declared(_running_details())
    if app not in apps:
        raise UsageError(_not_declared(app, apps))
    cfg = _app_pipeline_config(apps[app])
    for dep in apps[app].get("deployments") or []:
        if dep.get("name") == DEPLOYMENT and (dep.get("user_config") or {}).get("traffic"):
            return dict(dep["user_config"]["traffic"])
    return traffic(cfg)


def _not_declared(app: str, apps: dict[str, Any]) -> str:
    known = ", ".join(sorted(apps)) or "none"
    return (
        f"no Serve app {app!r} deployed from a config (declarative apps: {known}); traffic changes need an app "
        "started by `fabric serve`, `fabric.serve.control` or `serve run/deploy <yaml>`"
    )


def _app_pipeline_config(app: dict[str, Any]) -> PipelineConfig:
    from fabric.serve.spec import config_from_args

    return config_from_args(app.get("args") or {})


def set_traffic(weights: dict[str, float], app: str = "fabric", timeout_s: float = 120.0) -> dict[str, float]:
    """Change the traffic split of a running app without restarting its replicas.

    Versions not named get weight 0. Validated against the app's versions before anything is sent.

    Returns:
        The new weights as percentages.

    Raises:
        UsageError: an unknown app or version, a negative weight, or all weights 0.
    """
    from fabric.serve.router import TrafficSplit

    details = _running_details()
    apps = _declared(details)
    if app not in apps:
        raise UsageError(_not_declared(app, apps))
    cfg = _app_pipeline_config(apps[app])
    split = TrafficSplit(traffic(cfg))
    full = split.check(weights)
    split.update(full)
    deployments = [d for d in apps[app].get("deployments") or [] if d.get("name") != DEPLOYMENT]
    deployments.append({"name": DEPLOYMENT, "user_config": {"traffic": full}})
    apps[app]["deployments"] = deployments
    _apply(details, apps)
    _wait_running(app, timeout_s)
    return split.weights


def status(app: str | None = None) -> list[dict[str, Any]]:
    """Per app: status, deployments with replica states, and (for fabric apps) the traffic split."""
    from ray import serve

    st = serve.status()
    apps = _declared(_running_details())
    out = []
    for name, a in st.applications.items():
        if app and name != app:
            continue
        deps = {
            d_name: {
                "status": getattr(d.status, "value", d.status),
                "replicas": {getattr(k, "value", k): v for k, v in d.replica_states.items()},
            }
            for d_name, d in a.deployments.items()
        }
        row: dict[str, Any] = {
            "app": name,
            "status": getattr(a.status, "value", a.status),
            "message": a.message,
            "deployments": deps,
        }
        if name in apps and apps[name].get("import_path") == IMPORT_PATH:
            try:
                row["traffic"] = current_traffic(name)
            except Exception:  # a status line must not fail on one odd app
                pass
        out.append(row)
    return out


def delete(app: str = "fabric") -> None:
    """Remove the app (Serve and the cluster stay up)."""
    from ray import serve

    serve.delete(app)
