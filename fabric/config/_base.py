"""Base class for every config section: unknown keys are errors, assignments are re-validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Unknown keys are rejected so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations that pyarrow's filesystems resolve (s3, gs, hdfs, file)."""
    return "://" in path
