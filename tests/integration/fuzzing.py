"""Fuzzing of a served app from its own OpenAPI document (schemathesis driven through its Python API).

Every answer is validated against that document (schemathesis' ``validate_response``): its status is one the
operation declares, its content type and body match what the document says of that status, an invalid
request is refused with a 4xx, and nothing is a 5xx, a traceback or a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

# positive_data_acceptance is left out: a request valid by the document can still name an unknown model or,
# for the tabular app, features the served model lacks (the document cannot know the model's columns).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class FuzzResult:
    """What the fuzzing saw: the operations, each answer's status, and the problems (failed checks, 5xx,
    tracebacks, hangs), one line per operation, mode and kind of problem."""

    operations: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _seen: set[tuple[str, str, str]] = field(default_factory=set, repr=False)

    def problem(self, where: str, mode: GenerationMode, kind: str, detail: str) -> None:
        """Record a problem once per operation, generation mode and kind (the first example's detail)."""
        key = (where, mode.value, kind)
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append(f"{where} [{mode.value}] {kind}: {detail}")


def fuzz(
    url: str,
    max_examples: int,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    examples: dict[str, list[dict[str, Any]]] | None = None,
) -> FuzzResult:
    """Send valid and invalid requests generated from every operation of ``url``'s ``/openapi.json`` and
    validate each answer against it (:data:`CHECKS`).

    ``examples`` adds requests of one's own, validated alike: operation label (``POST /v1/completions``) ->
    ``Case`` arguments (``body``, ``path_parameters``, ``query``), e.g. the served model's real name, which
    generated requests do not guess. A request that hangs past ``timeout_s`` or a transport error counts as a
    problem, like a failed check or a traceback in a body. An operation without inputs has no invalid form:
    only its valid requests are sent.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    out = FuzzResult()

    def send(case: Any, mode: GenerationMode) -> None:
        where = f"{case.method} {case.path}"
        try:
            response = case.call(base_url=url, headers=headers, timeout=timeout_s)
        except Exception as e:  # the transport's timeout and connection errors
            out.problem(where, mode, type(e).__name__, str(e)[:200])
            return
        out.statuses.append(response.status_code)
        if "Traceback" in response.text:
            out.problem(where, mode, "traceback", f"{response.status_code} {response.text[:200]!r}")
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                sent = f"{case.method} {case.formatted_path} body={case.body!r}"[:300]
                detail = f"{response.status_code} {response.text[:200]!r} <- {sent}; {failure.message[:300]}"
                out.problem(where, mode, failure.title, detail)

    def generated(op: Any, mode: GenerationMode) -> Callable[[], None]:
        @settings(max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            send(case, mode)

        return run

    for op in (result.ok() for result in schema.get_all_operations()):
        out.operations.append(op.label)
        for kwargs in (examples or {}).get(op.label, []):
            send(op.Case(**kwargs), GenerationMode.POSITIVE)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                generated(op, mode)()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, op.label
    unknown = set(examples or {}) - set(out.operations)
    assert not unknown, f"examples for operations the document lacks: {sorted(unknown)}"
    return out
