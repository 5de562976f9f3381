"""The notebooks run top to bottom in a kernel of this environment, and are committed without outputs.

Each notebook runs as a user runs it (from notebooks/, its own local Ray, its own temporary run_dir); a
cell appended in memory then reads what the user would look at and prints it as JSON for the checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

from fabric.runtime import free_port
from fabric.serve.spec import SIDE_PORT_VARS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
# A smaller run than a user's (the notebooks read FABRIC_NOTEBOOK_OVERRIDES): every stage and call still runs,
# with fewer trials and epochs, and the LLM app on fabric's transformers engine (its OpenAI layer answers the same
# calls; vLLM's start, tens of CPU-seconds, is tested once, in test_llm_vllm).
OVERRIDES = {
    "quickstart.ipynb": "tune.num_samples=2 tune.epochs_per_trial=1 train.epochs=2",
    "llm.ipynb": "llm.finetune.epochs=2 llm.serve.engine=transformers",
}

# What each notebook must have shown, read from its kernel after the last cell.
PROBES = {
    "quickstart.ipynb": """
import json
print("PROBE " + json.dumps({
    "ray_running": ray.is_initialized(),
    "run_dir_left": RUN_DIR.exists(),
    "trials": result.stages["tune"].num_trials,
    "train_epochs": len(trained.history),
    "accuracy": accuracy,
    "baseline": float(1 - ordinary["target"].mean()),
    "bad_status": bad.status_code,
    "bad_body": bad.json(),
    "before": {k: before[k] for k in ("status", "dataset_drift", "drifted_columns", "window_size")},
    "after": {k: after[k] for k in ("status", "dataset_drift", "drifted_columns", "window_size")},
    "report_bytes": len(report.text),
}))
""",
    "llm.ipynb": """
import json
from fabric.runtime import free_port
print("PROBE " + json.dumps({
    "ray_running": ray.is_initialized(),
    "run_dir_left": RUN_DIR.exists(),
    "perplexity_before": perplexity_before,
    "perplexity_after": perplexity_after,
    "epochs": history["epoch"].tolist(),
    "models": models,
    "replies": replies,
    "streamed": streamed,
    "bad_status": bad["status"],
    "bad_body": bad["body"],
    "drift": {k: drift[k] for k in ("status", "window_size", "columns")},
    "served": len(served),
}))
""",
}


def _text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


def test_every_notebook_is_checked() -> None:
    assert {p.name for p in NOTEBOOKS} == set(PROBES) == set(OVERRIDES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    # The kernel inherits this environment: fabric's state away from the user's,
    # and the fast path's side listeners (fixed ports by default: HAProxy's stats and metrics, the fallback proxy)
    # on free ones.
    monkeypatch.setenv("FABRIC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for var in SIDE_PORT_VARS:
        monkeypatch.setenv(var, str(free_port()))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("FABRIC_NOTEBOOK_OVERRIDES", OVERRIDES[path.name])
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBES[path.name]))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",  # ipykernel's own kernelspec: this interpreter, so this environment's fabric
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError with the cell and its traceback on the first failure

    figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    probe = next(line for line in _text(nb.cells[-1]).splitlines() if line.startswith("PROBE "))
    result = json.loads(probe.removeprefix("PROBE "))
    CHECKS[path.name](result, figures)


def _check_quickstart(r: dict[str, Any], figures: int) -> None:
    assert figures >= 2, "the training curves and the drift plots"
    assert r["ray_running"] is False and r["run_dir_left"] is False, "a clean shutdown"
    assert (r["trials"], r["train_epochs"]) == (2, 2), "the test's smaller run (OVERRIDES)"
    assert r["accuracy"] >= r["baseline"] - 0.02, r
    assert 400 <= r["bad_status"] < 500 and r["bad_body"]["error"], r["bad_body"]
    assert r["before"]["status"] == "ok" and r["before"]["window_size"] == 400
    assert r["before"]["dataset_drift"] is False, r["before"]
    assert r["after"]["status"] == "ok" and r["after"]["dataset_drift"] is True, r["after"]
    assert {"age", "yrs_married", "children"} <= set(r["after"]["drifted_columns"]), r["after"]
    assert r["report_bytes"] > 10_000


def _check_llm(r: dict[str, Any], figures: int) -> None:
    assert figures >= 2, "perplexity before/after with the per-epoch curves, and the served lengths"
    assert r["ray_running"] is False and r["run_dir_left"] is False, "a clean shutdown"
    assert r["perplexity_after"] < r["perplexity_before"], r
    assert r["epochs"] == [1, 2], "every epoch of the test's smaller run (OVERRIDES)"
    assert r["models"] == ["llm-smoke", "llm-smoke:finetuned"]
    replies = r["replies"]
    for who in ("base", "adapter"):  # both the base model and the adapter answered every question
        assert replies[who] and all(isinstance(t, str) and t for t in replies[who]), replies
    assert replies["adapter"] != replies["base"], "the adapter changes the answers"
    assert isinstance(r["streamed"], str) and r["streamed"], r["streamed"]
    assert 400 <= r["bad_status"] < 500, r
    assert {"message", "type", "param", "code"} <= set(r["bad_body"]) and r["bad_body"]["message"], r["bad_body"]
    assert r["bad_body"]["param"] == "temperature", r["bad_body"]
    # the monitor received the served chats (one row per answered choice) and compared them
    assert r["drift"]["status"] == "ok", r["drift"]
    assert r["drift"]["window_size"] >= r["served"] >= 10
    assert set(r["drift"]["columns"]) == {"prompt_tokens", "completion_tokens"}


CHECKS = {"quickstart.ipynb": _check_quickstart, "llm.ipynb": _check_llm}
