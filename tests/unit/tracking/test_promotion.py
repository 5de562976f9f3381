"""Promotion decisions on synthetic per-row losses: no MLflow, no models."""

from __future__ import annotations

import numpy as np
import pytest

from fabric.errors import FabricError
from fabric.tracking import compare, decide
from fabric.tracking._predict import per_row_loss, probabilities, score


def _losses(n: int = 400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 0.2, n)


def test_clearly_worse_candidate_is_rejected() -> None:
    champion = _losses()
    candidate = champion + np.random.default_rng(1).normal(0.1, 0.05, champion.shape)
    c = compare(candidate, champion, alpha=0.05, bootstrap_samples=500)
    d = decide(c)
    assert c.significantly_worse and not d.promote
    assert c.mean_diff > 0 and c.ci_low > 0 and c.p_value < 1e-6
    assert "significantly worse" in d.reason and d.label == "rejected"
    assert d.numbers()["p_value"] == c.p_value


def test_equal_candidate_is_promoted() -> None:
    champion = _losses()
    noise = np.random.default_rng(2).normal(0.0, 0.05, champion.shape)
    c = compare(champion + noise - noise.mean(), champion, alpha=0.05, bootstrap_samples=500)
    d = decide(c)
    assert d.promote and not c.significantly_worse
    assert c.ci_low < 0 < c.ci_high
    assert "not significantly worse" in d.reason


def test_better_candidate_is_promoted() -> None:
    champion = _losses()
    c = compare(champion * 0.7, champion, bootstrap_samples=200)
    assert decide(c).promote and c.mean_diff < 0 and c.ci_high < 0 and c.p_value > 0.99


def test_identical_models_are_not_worse() -> None:
    champion = _losses()
    c = compare(champion, champion, bootstrap_samples=200)
    assert c.p_value == 1.0 and c.mean_diff == 0.0 and decide(c).promote


def test_constant_shift_counts_as_worse() -> None:
    champion = _losses()
    assert decide(compare(champion + 0.01, champion, bootstrap_samples=200)).promote is False


def test_slightly_worse_on_few_rows_is_not_significant() -> None:
    rng = np.random.default_rng(3)
    champion = rng.gamma(2.0, 0.2, 20)
    candidate = champion + rng.normal(0.01, 0.2, 20)
    assert decide(compare(candidate, champion, alpha=0.05, bootstrap_samples=200)).promote


def test_first_model_becomes_champion_saying_so() -> None:
    d = decide(None)
    assert d.promote and "no champion" in d.reason and d.numbers() == {}


def test_bootstrap_is_seeded() -> None:
    a, b = _losses(seed=4), _losses(seed=5)
    assert compare(a, b, seed=7, bootstrap_samples=300) == compare(a, b, seed=7, bootstrap_samples=300)


@pytest.mark.parametrize(
    ("cand", "champ", "msg"),
    [
        (np.ones(3), np.ones(4), "differ in length"),
        (np.ones(1), np.ones(1), "at least 2"),
        (np.array([1.0, np.nan]), np.ones(2), "NaN"),
    ],
)
def test_bad_inputs_raise(cand: np.ndarray, champ: np.ndarray, msg: str) -> None:
    with pytest.raises(FabricError, match=msg):
        compare(cand, champ)


def test_losses_and_scores() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 1])
    assert np.allclose(probabilities(logits).sum(axis=1), 1.0)
    loss = per_row_loss(logits, labels, "classification")
    assert loss[2] > loss[0] > 0
    assert score(logits, labels, "classification")["accuracy"] == pytest.approx(2 / 3)
    # one logit column: a binary sigmoid
    assert probabilities(np.array([[0.0]])).tolist() == [[0.5, 0.5]]
    reg = score(np.array([[1.0], [3.0]]), np.array([1.0, 1.0]), "regression")
    assert reg["rmse"] == pytest.approx(np.sqrt(2.0)) and reg["mae"] == pytest.approx(1.0)
    assert per_row_loss(np.array([[1.0], [3.0]]), np.array([1.0, 1.0]), "regression").tolist() == [0.0, 4.0]
