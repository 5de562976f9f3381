"""The search's results table and learning-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.config import Param

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune import ResultGrid


def saved_trial_states(experiment: str | Path) -> dict[str, str]:
    """Trial id -> status (TERMINATED, ERROR, PENDING, RUNNING, PAUSED) in the experiment state Tune saved last.

    Read from disk on purpose: when a search is interrupted Tune saves the state (trials still RUNNING or
    PENDING, which is what a resume continues) and then stops the live trials, which marks them TERMINATED in
    memory, so the ResultGrid it returns shows an interrupted last trial as finished.
    """
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(experiment)).trials}


def results_table(
    grid: ResultGrid, space: dict[str, Param], metric: str, mode: str, states: dict[str, str]
) -> pd.DataFrame:
    """One row per trial: its hyperparameters, epochs run, last and best ``metric``, and status; best first.

    ``states`` are the trials' saved statuses (:func:`saved_trial_states`).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    longest = _max_epochs(grid)
    # The grid's results are in the order of its trials: ids from there (a trial without results has no metrics).
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        history = result.metrics_dataframe
        values = history[metric].dropna() if history is not None and metric in history else pd.Series(dtype=float)
        row: dict[str, Any] = {"trial": trial.trial_id}
        config = result.config or {}  # a trial interrupted before it started has none
        row.update({k: config.get(k) for k in space})
        row["epochs"] = int(len(values))
        row[f"last_{metric}"] = float(values.iloc[-1]) if len(values) else float("nan")
        row[f"best_{metric}"] = float(values.min() if mode == "min" else values.max()) if len(values) else float("nan")
        state = states.get(trial.trial_id, "PENDING")  # not in the saved state: created after it, never run
        if result.error or state == "ERROR":
            row["status"] = "error"
        elif state != "TERMINATED":
            row["status"] = "interrupted"
        else:
            row["status"] = "stopped early" if len(values) < longest else "completed"
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last")
    return table


def _max_epochs(grid: ResultGrid) -> int:
    lengths = [len(r.metrics_dataframe) for r in grid if r.metrics_dataframe is not None]
    return max(lengths, default=0)


def learning_curves_png(grid: ResultGrid, metric: str, path: Path) -> Path:
    """Plot ``metric`` per epoch for every trial (ASHA's early stops show as short curves)."""
    # A bare Figure (no pyplot, no matplotlib.use) leaves the caller's backend alone, so a notebook that runs
    # the search still shows its own plots inline.
    import matplotlib.ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for result in grid:
        df = result.metrics_dataframe
        if df is None or metric not in df:
            continue
        x = df["epoch"] if "epoch" in df else range(1, len(df) + 1)
        ax.plot(x, df[metric], marker="o", markersize=3, linewidth=1.2, label=(result.metrics or {}).get("trial_id"))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"Trial learning curves ({metric})")
    ax.grid(alpha=0.3)
    if ax.lines and len(grid) <= 12:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
