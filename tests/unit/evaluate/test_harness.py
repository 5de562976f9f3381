"""The evaluation stage's pieces that need no server: task folders, score names, the table, lm-eval's tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabric.evaluate import SHIPPED_TASKS, EvalResult
from fabric.evaluate._harness import _flatten, task_folder


def test_relative_data_files_become_absolute_and_lm_eval_loads_the_shipped_tasks(tmp_path: Path) -> None:
    out = task_folder(None, tmp_path / "tasks")
    doc = yaml.safe_load((out / "fabric_capitals.yaml").read_text())
    assert doc["dataset_kwargs"]["data_files"]["test"] == str(SHIPPED_TASKS / "capitals.jsonl")
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(out))
    tasks = get_task_dict(["fabric_capitals", "fabric_arithmetic"], manager)
    docs = list(tasks["fabric_capitals"].test_docs())
    assert len(docs) == 30 and docs[0]["choices"][docs[0]["answer"]]  # the data came from the local file
    assert tasks["fabric_arithmetic"].OUTPUT_TYPE == "generate_until"


def test_a_users_task_folder_keeps_its_other_files(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    src.mkdir()
    (src / "d.jsonl").write_text('{"q": "x", "a": "y"}\n')
    (src / "t.yaml").write_text(yaml.safe_dump({"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": "d.jsonl"}}))
    (src / "custom.yaml").write_text("task: c\nprocess_docs: !function utils.process\n")
    out = task_folder(str(src), tmp_path / "copy")
    assert yaml.safe_load((out / "t.yaml").read_text())["dataset_kwargs"]["data_files"] == str(src / "d.jsonl")
    assert "!function" in (out / "custom.yaml").read_text()  # custom tags are copied as written


def test_scores_are_named_task_slash_metric_without_stderr() -> None:
    results = {"a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 8}, "b": {"exact_match,strict": 1.0}}
    assert _flatten(results) == {"a/acc": 0.5, "b/exact_match,strict": 1.0}


def test_the_table_has_the_base_first_and_a_dash_for_missing_scores() -> None:
    table = EvalResult({"m:ft": {"t/acc": 0.75}, "m": {"t/acc": 0.5, "u/em": 0.0}}, base="m").table()
    lines = table.splitlines()
    assert lines[0].split() == ["score", "m", "m:ft"]
    assert lines[2].split() == ["t/acc", "0.5000", "0.7500"] and lines[3].split() == ["u/em", "0.0000", "-"]
