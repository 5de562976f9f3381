"""lm-evaluation-harness against a served OpenAI app, its scores in MLflow, and the promotion rule on a score."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import ConfigError, ConfigProblem, FabricError, require

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

log = logging.getLogger("fabric.evaluate")
SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
"""fabric's own small tasks (task YAMLs with their JSON-lines data)."""


@dataclass
class EvalResult:
    """Scores per served model id, as ``{"<task>/<metric>": value}``."""

    scores: dict[str, dict[str, float]]
    base: str
    """The base model's id (the others are its adapters)."""
    run_id: str | None = None
    """The MLflow run the scores were logged to (the registered adapter's), or None."""
    promoted: str | None = None
    """The adapter version aliased ``champion`` by the promotion rule, or None."""
    notes: list[str] = field(default_factory=list)
    url: str = ""
    """Where the evaluated app answered."""

    def report(self) -> str:
        """The tasks and URL, the table, and what was logged or promoted (what ``fabric eval-llm`` prints)."""
        head = f"eval-llm: {', '.join(sorted({k.split('/')[0] for s in self.scores.values() for k in s}))}"
        return "\n".join([head + (f" at {self.url}" if self.url else ""), self.table(), *self.notes])

    def table(self) -> str:
        """Base vs each adapter, one row per score."""
        models = [self.base, *sorted(m for m in self.scores if m != self.base)]
        metrics = sorted({k for s in self.scores.values() for k in s})
        rows = [["score", *models]] + [[m, *(_fmt(self.scores.get(x, {}).get(m)) for x in models)] for m in metrics]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _get(url: str, path: str, key: str | None) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise FabricError(f"llm.eval: no OpenAI app answers at {url} ({e}); start one with `fabric serve-llm`") from e
    if r.status_code != 200:
        raise FabricError(f"llm.eval: GET {url}{path} answered {r.status_code}: {r.text[:200]}")
    return r.json()


def task_folder(include_path: str | None, into: Path) -> Path:
    """A copy of the task YAMLs (``include_path`` or :data:`SHIPPED_TASKS`) with relative ``data_files`` made
    absolute (lm-evaluation-harness would resolve them against the working directory)."""
    import yaml

    src = Path(include_path).expanduser().resolve() if include_path else SHIPPED_TASKS
    shutil.copytree(src, into, dirs_exist_ok=True)
    for path in into.rglob("*.yaml"):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError:  # custom tags (!function): left as written
            continue
        files = ((doc or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(doc, dict) else None
        if not files:
            continue
        here = src / path.relative_to(into).parent

        def absolute(f: str) -> str:
            return f if "://" in f or Path(f).is_absolute() else str((here / f).resolve())

        if isinstance(files, str):
            doc["dataset_kwargs"]["data_files"] = absolute(files)
        elif isinstance(files, list):
            doc["dataset_kwargs"]["data_files"] = [absolute(f) for f in files]
        else:
            doc["dataset_kwargs"]["data_files"] = {
                k: ([absolute(f) for f in v] if isinstance(v, list) else absolute(v)) for k, v in files.items()
            }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return into


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"acc,none": x, "acc_stderr,none": s}}``) as ``{"task/acc": x}``."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in name:
                continue
            if name.startswith("sample_len"):  # how many documents ran, not a score
                continue
            metric, _, filt = name.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f",{filt}")] = float(value)
    return out


def evaluate(cfg: PipelineConfig, url: str) -> EvalResult:
    """Run ``cfg.llm.eval.tasks`` with lm-evaluation-harness against the app at ``url`` for each model it serves.

    lm-eval's ``local-completions`` client sends what it sends to any OpenAI server (``echo`` + ``logprobs`` for
    log-likelihoods, plain completions for generation), tokenizing with the server's own tokenizer
    (``/tokenizer_info``, ``/tokenize``). Scores go to MLflow and, with ``promote_metric``, decide promotion
    (see :func:`record`).

    Raises:
        ConfigError: a task or a model id that does not exist.
        FabricError: no app answers at ``url``.
    """
    e = cfg.llm.eval
    key_env = cfg.llm.serve.api_key_env
    key = os.environ.get(key_env) if key_env else None
    cards = _get(url, "/v1/models", key)["data"]
    served = [c["id"] for c in cards]
    base = next((c["id"] for c in cards if not c.get("parent")), served[0])
    models = e.models or served
    unknown = [m for m in models if m not in served]
    if unknown:
        raise ConfigError([ConfigProblem("llm.eval.models", f"not served at {url}: {unknown}; served: {served}")])
    context = next((int(c["max_model_len"]) for c in cards if c.get("max_model_len")), 2048)
    lm_eval = require("lm_eval", "eval")
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data are local files: never ask a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scores: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fabric-eval-") as tmp:
        manager = TaskManager(include_path=str(task_folder(e.include_path, Path(tmp) / "tasks")))
        missing = [t for t in e.tasks if t not in manager.all_tasks]
        if missing:
            where = e.include_path or SHIPPED_TASKS
            raise ConfigError([ConfigProblem("llm.eval.tasks", f"no task {missing} in {where} (nor lm-eval's own)")])
        for model in models:
            log.info("eval: %s on %s", model, ", ".join(e.tasks))
            out = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={
                    "model": model,
                    "base_url": url.rstrip("/") + "/v1/completions",
                    "tokenizer_backend": "remote",
                    "auth_token": key,  # the remote tokenizer's requests
                    "header": {"Authorization": f"Bearer {key}"} if key else None,  # the completions' requests
                    "num_concurrent": e.num_concurrent,
                    "max_retries": 2,
                    "max_length": context,
                },
                tasks=list(e.tasks),
                task_manager=manager,
                limit=e.limit,
                log_samples=False,
                bootstrap_iters=0,
            )
            scores[model] = _flatten(out["results"])
    return EvalResult(scores, base)


def record(cfg: PipelineConfig, result: EvalResult) -> EvalResult:
    """Log ``result`` to the run of the adapter version aliased ``candidate`` (the last fine-tuning registered)
    as ``eval/<model>/<task>/<metric>``; with ``llm.eval.promote_metric``, alias that version ``champion`` when
    every served adapter's score is not worse than the base's (else say why not). Nothing when no adapter of
    ``llm.finetune.model_name`` is registered."""
    from fabric.tracking import CANDIDATE, CHAMPION, alias_version, tracking_uri

    mlflow = require("mlflow", "track")
    name = cfg.llm.finetune.model_name
    client = mlflow.MlflowClient(tracking_uri(cfg))
    version = alias_version(client, name, CANDIDATE)
    if version is None:
        result.notes.append(f"no adapter of {name} is registered: scores not logged to MLflow")
        return result
    run_id = client.get_model_version(name, version).run_id
    for model, metrics in result.scores.items():
        kind = "base" if model == result.base else model.rpartition(":")[2]
        for metric, value in metrics.items():
            client.log_metric(run_id, f"eval/{kind}/{metric}".replace(",", "_"), value)
    result.run_id = run_id
    metric = cfg.llm.eval.promote_metric
    if metric is None:
        return result
    base = result.scores.get(result.base, {}).get(metric)
    adapters = {m: s.get(metric) for m, s in result.scores.items() if m != result.base}
    if base is None or not adapters or any(v is None for v in adapters.values()):
        result.notes.append(f"promotion: {metric} was not measured for the base and every adapter: nothing promoted")
        return result
    worse = {m: v for m, v in adapters.items() if v is not None and v < base}
    if worse:
        shown = {m: round(v, 4) for m, v in worse.items()}
        result.notes.append(f"promotion: {name} v{version} not promoted: {metric} {shown} < base {base:.4f}")
        return result
    client.set_registered_model_alias(name, CHAMPION, version)
    result.promoted = version
    shown = {m: round(v, 4) for m, v in adapters.items() if v is not None}
    result.notes.append(f"promotion: {name} v{version} is {CHAMPION}: {metric} {shown} >= base {base:.4f}")
    return result
