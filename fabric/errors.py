"""One exception tree for everything fabric raises on purpose.

Every error carries structured fields (so a CLI, an HTTP handler or a test can read them) and
pickles cleanly (so it crosses Ray task and actor boundaries intact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class FabricError(Exception):
    """Base class of every error fabric raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the instance dict so subclasses with keyword-only fields survive pickling.
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls: type[FabricError], state: dict[str, Any], args: tuple[Any, ...]) -> FabricError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: the dotted field path and what is wrong or allowed."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(FabricError):
    """A config failed validation; ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[ConfigProblem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class DataValidationError(FabricError):
    """Data broke the schema or an expectation; names the column, the count and sample rows."""

    def __init__(
        self,
        message: str,
        *,
        column: str | None = None,
        rows: int | None = None,
        examples: list[dict[str, Any]] | None = None,
    ) -> None:
        self.column = column
        self.rows = rows
        self.examples = list(examples or [])
        text = message
        if self.examples:
            text += "\n  e.g. " + "\n       ".join(repr(r) for r in self.examples)
        super().__init__(text)


class UsageError(FabricError):
    """A command was given something it cannot use (an unknown job id, an upload that is too big)."""


class ClusterError(FabricError):
    """The local Ray head or the cluster at an address is unreachable or misconfigured."""


class JobError(FabricError):
    """A Ray job could not be submitted, or ended in failure."""


class MissingExtraError(FabricError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(f"{module} is not installed: pip install 'fabric[{extra}]'")


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise MissingExtraError naming ``extra``.

    Args:
        module: dotted module name, e.g. ``"mlflow"``.
        extra: the pyproject extra that installs it, e.g. ``"track"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(module, extra) from e
