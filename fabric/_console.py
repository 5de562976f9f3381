"""fabric's progress lines: the ``fabric`` logger writes them to standard output.

Every stage reports through ``logging.getLogger(__name__)`` (a child of ``fabric``). By default the ``fabric``
logger prints INFO and above as the bare message (warnings prefixed ``warning:``) on whatever ``sys.stdout``
is at the time (pytest's capture, a Ray worker's forwarded stdout, a job's log). An application that wants
fabric's records in its own logging setup removes this handler and sets ``propagate`` back to True.
"""

from __future__ import annotations

import logging
import sys


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler bound to the current ``sys.stdout``, not the one at import."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the StreamHandler attribute
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _Plain(logging.Formatter):
    """The message alone; ``warning:`` / ``error:`` before a record at WARNING and above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def install() -> None:
    """Give the ``fabric`` logger its stdout handler (once; a no-op when it has handlers already)."""
    logger = logging.getLogger("fabric")
    if logger.handlers:
        return
    handler = _Stdout()
    handler.setFormatter(_Plain("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
