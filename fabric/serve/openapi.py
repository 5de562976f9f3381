"""What the apps' OpenAPI documents must say that FastAPI's route declarations cannot.

Both HTTP apps (:mod:`fabric.serve.api`, :mod:`fabric.serve.llm.api`) complete their generated document with
these, so that it tells the truth about every answer (the fuzzing tests validate each one against it):

* an error body is JSON on every route, also on one answering HTML (FastAPI files such a route's declared
  errors under ``text/html``);
* a status any route may answer (the last-resort 500, the API key's 401) is declared on each route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

JSON = "application/json"
METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(path, operation)`` for every operation of ``schema``."""
    return [
        (path, op)
        for path, item in schema.get("paths", {}).items()
        for method, op in item.items()
        if method in METHODS
    ]


def json_error_bodies(schema: dict[str, Any]) -> None:
    """File every error status' body (4xx, 5xx) under ``application/json``, where FastAPI put it under
    ``text/html`` (a route with ``response_class=HTMLResponse``): error bodies are JSON on every route."""
    for _, op in operations(schema):
        for status, response in op.get("responses", {}).items():
            content = response.get("content", {})
            if status[:1] in "45" and "text/html" in content and JSON not in content:
                content[JSON] = content.pop("text/html")


def declare_everywhere(
    schema: dict[str, Any],
    status: int,
    description: str,
    body: dict[str, Any],
    where: Callable[[str], bool] = lambda path: True,
    headers: dict[str, str] | None = None,
) -> None:
    """Declare ``status`` with the JSON ``body`` schema (and the optional string ``headers``: name ->
    description) on every operation of a path ``where`` accepts that does not declare it already."""
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": body}}}
    if headers:
        response["headers"] = {k: {"description": v, "schema": {"type": "string"}} for k, v in headers.items()}
    for path, op in operations(schema):
        if where(path):
            op.setdefault("responses", {}).setdefault(str(status), response)
