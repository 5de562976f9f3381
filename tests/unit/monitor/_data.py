"""Reference data, serving-shaped rows and a fake clock for the drift-monitor tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

N_REF = 1000
WINDOW = 400
CITIES = ["paris", "rome", "oslo"]


def make_frame(n: int, seed: int, *, age_shift: float = 0.0, city_p: list[float] | None = None) -> pd.DataFrame:
    """Two numeric, one integer-coded categorical and one string categorical column, plus a binary target
    (30% ones, whatever the features: the toy model below predicts it badly, as real models do)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.normal(40 + age_shift, 10, n),
        "income": rng.lognormal(10, 0.5, n),
        "plan": rng.choice([1, 2, 3], n),
        "city": rng.choice(CITIES, n, p=city_p),
        "target": (rng.random(n) < 0.3).astype(int),
    })  # fmt: skip


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def model(frame: pd.DataFrame) -> list[int]:
    """The toy model's predictions: 1 over 40 years of age (half the rows; the labels are 30% ones)."""
    return [int(a > 40) for a in frame["age"]]


def rows_and_preds(frame: pd.DataFrame) -> tuple[list[dict], list[int]]:
    """Serving-shaped input: JSON-like row dicts without the target, and the toy model's predictions."""
    rows = frame.drop(columns=["target"]).to_dict("records")
    return rows, model(frame)
