"""Fuzzing of a served app from its own OpenAPI document (schemathesis driven through its Python API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


@dataclass
class FuzzResult:
    """What the fuzzing saw: the operations, each answer's status, and the problems (5xx, tracebacks, hangs)."""

    operations: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def fuzz(url: str, max_examples: int, timeout_s: float, headers: dict[str, str] | None = None) -> FuzzResult:
    """Send valid and invalid requests generated from every operation of ``url``'s ``/openapi.json``.

    A request that hangs past ``timeout_s`` or a transport error counts as a problem, like a 5xx or a
    traceback in a body. An operation without inputs has no invalid form: only its valid requests are sent.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    out = FuzzResult()
    for op in (result.ok() for result in schema.get_all_operations()):
        out.operations.append(op.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                where = f"{case.method} {case.formatted_path}"
                try:
                    response = case.call(base_url=url, headers=headers, timeout=timeout_s)
                except Exception as e:  # the transport's timeout and connection errors
                    out.problems.append(f"{where}: {type(e).__name__}")
                    return
                out.statuses.append(response.status_code)
                if response.status_code >= 500 or "Traceback" in response.text:
                    out.problems.append(f"{where}: {response.status_code} {response.text[:200]!r}")

            try:
                check()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, op.label
    return out
