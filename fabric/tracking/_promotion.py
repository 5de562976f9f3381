"""Should the candidate replace the champion? A paired test on per-row test losses plus a bootstrap CI.

Pure functions over numpy arrays: unit-tested on synthetic losses, no MLflow involved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fabric.errors import FabricError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on the same rows. ``mean_diff`` > 0 means the candidate's loss is higher."""

    n: int
    candidate_loss: float
    champion_loss: float
    mean_diff: float
    ci_low: float
    ci_high: float
    """Bootstrap percentile interval of ``mean_diff`` at confidence ``1 - alpha``."""
    p_value: float
    """One-sided paired t-test, alternative: the candidate's mean loss is greater."""
    alpha: float

    @property
    def significantly_worse(self) -> bool:
        return self.p_value < self.alpha


@dataclass(frozen=True)
class Decision:
    """The promotion verdict, why, and the numbers behind it (None when there was nothing to compare)."""

    promote: bool
    reason: str
    comparison: Comparison | None = None

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"

    def numbers(self) -> dict[str, float]:
        """Flat numbers for run metrics: ``n``, losses, ``mean_diff``, CI bounds, ``p_value``, ``alpha``."""
        if self.comparison is None:
            return {}
        return {k: float(v) for k, v in asdict(self.comparison).items()}


def _one_sided_p(diff: np.ndarray) -> float:
    """p of the paired t-test H1: mean(diff) > 0, with the degenerate zero-variance case made explicit."""
    from scipy import stats

    mean = float(diff.mean())
    if float(diff.std(ddof=1)) == 0.0:
        # Every row differs by the same amount: no noise to weigh it against.
        return 0.0 if mean > 0 else 1.0
    return float(stats.ttest_1samp(diff, 0.0, alternative="greater").pvalue)


def bootstrap_ci(diff: np.ndarray, alpha: float, samples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diff`` at confidence ``1 - alpha``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(samples)
    # Resample in chunks so a large test split never materialises samples x n indices at once.
    step = max(1, 2_000_000 // n)
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def compare(
    candidate_losses: np.ndarray,
    champion_losses: np.ndarray,
    alpha: float = 0.05,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Pair the two models' per-row losses (same rows, same order) and test whether the candidate is worse.

    Raises:
        FabricError: the arrays differ in length, hold fewer than two rows, or hold NaN/inf.
    """
    import numpy as np

    cand = np.asarray(candidate_losses, dtype=np.float64).reshape(-1)
    champ = np.asarray(champion_losses, dtype=np.float64).reshape(-1)
    if cand.shape != champ.shape:
        raise FabricError(f"paired losses differ in length: {cand.shape[0]} vs {champ.shape[0]}")
    if cand.shape[0] < 2:
        raise FabricError(f"a paired test needs at least 2 test rows, got {cand.shape[0]}")
    if not (np.isfinite(cand).all() and np.isfinite(champ).all()):
        raise FabricError("per-row losses hold NaN or inf; the models cannot be compared")
    diff = cand - champ
    low, high = bootstrap_ci(diff, alpha, bootstrap_samples, seed)
    return Comparison(
        n=int(diff.shape[0]),
        candidate_loss=float(cand.mean()),
        champion_loss=float(champ.mean()),
        mean_diff=float(diff.mean()),
        ci_low=low,
        ci_high=high,
        p_value=_one_sided_p(diff),
        alpha=alpha,
    )


def decide(comparison: Comparison | None) -> Decision:
    """Promote unless the candidate is significantly worse; with no champion, promote directly."""
    if comparison is None:
        return Decision(True, "no champion yet: the candidate becomes champion directly")
    c = comparison
    conf = f"{(1 - c.alpha) * 100:g}%"
    detail = (
        f"mean loss {c.candidate_loss:.4g} vs champion {c.champion_loss:.4g} over {c.n} test rows, "
        f"diff {c.mean_diff:+.4g} ({conf} bootstrap CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}]), "
        f"one-sided paired t-test p={_fmt_p(c.p_value)}"
    )
    if c.significantly_worse:
        return Decision(False, f"significantly worse than the champion (p < alpha {c.alpha:g}): {detail}", c)
    return Decision(True, f"not significantly worse than the champion (p >= alpha {c.alpha:g}): {detail}", c)


def _fmt_p(p: float) -> str:
    return "<1e-300" if p == 0.0 or (p > 0 and math.log10(p) < -300) else f"{p:.3g}"
