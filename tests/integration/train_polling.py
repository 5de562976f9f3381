"""A module fixture for tests that run Ray Train fits: the controller collects the workers' reports often.

Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default) and a
worker's next ``ray.train.report`` waits for that poll (its result queue holds one report), so every epoch of a
torch run and the end of every run cost up to 2 s of waiting. Tree runs poll every
``fabric.train._trees.REPORT_POLL_S`` already; this gives a test module's torch runs the same. It changes when
reports are collected, not what a run computes or reports.

Use: ``from tests.integration.train_polling import frequent_train_reports  # noqa: F401`` (autouse, per module).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabric.train._trees import REPORT_POLL_S

VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@pytest.fixture(scope="module", autouse=True)
def frequent_train_reports() -> Iterator[None]:
    """Ray Train fits started by this module's tests collect reports every ``REPORT_POLL_S`` seconds (Ray passes
    ``RAY_TRAIN_*`` variables on to the controller it starts); the variable is restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VARIABLE, REPORT_POLL_S)
        yield
