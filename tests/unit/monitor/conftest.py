"""Fixtures of the drift-monitor unit tests (no Ray)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.unit.monitor._data import N_REF, FakeClock, make_frame


@pytest.fixture
def reference() -> pd.DataFrame:
    return make_frame(N_REF, seed=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
