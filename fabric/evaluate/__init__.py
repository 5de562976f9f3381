"""Evaluation as a lifecycle stage: lm-evaluation-harness against a served language model, over HTTP only.

* :func:`run` — evaluate the app at a URL on ``llm.eval``'s tasks, log the scores to MLflow, apply the
  promotion rule (``fabric eval-llm`` and ``jobs/eval_llm.py`` print its base-vs-adapter table)
* :func:`evaluate`, :func:`record` — the two halves; :class:`EvalResult`

Importing this package loads neither lm-eval nor mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fabric.evaluate._harness import SHIPPED_TASKS, EvalResult, evaluate, record

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

__all__ = ["SHIPPED_TASKS", "EvalResult", "evaluate", "record", "run"]


def run(cfg: PipelineConfig, url: str | None = None) -> EvalResult:
    """Evaluate every model the app at ``url`` (or ``llm.eval.url``) serves, or ``llm.eval.models``; record the
    scores and apply the promotion rule (``EvalResult.report()`` is the base-vs-adapter table and what was done).

    Raises:
        UsageError: no URL given (``fabric eval-llm`` and ``jobs/eval_llm.py`` deploy the app then).
    """
    from fabric.errors import UsageError

    url = url or cfg.llm.eval.url
    if not url:
        raise UsageError("llm.eval.url: no app to evaluate (set it, or run `fabric eval-llm`, which deploys one)")
    result = record(cfg, evaluate(cfg, url))
    result.url = url
    return result
