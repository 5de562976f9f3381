"""Config of the drift monitor."""

from __future__ import annotations

import string

from pydantic import Field, field_validator

from fabric.config._base import Section

# Evidently 0.7's registered statistical tests (`evidently.legacy.calculations.stattests`), listed here so a
# typo fails config validation instead of the first drift computation, without importing Evidently.
NUM_STATTESTS = (
    "ks", "wasserstein", "anderson", "cramer_von_mises", "ed", "es", "mannw", "t_test", "empirical_mmd",
    "jensenshannon", "kl_div", "psi", "hellinger",
)  # fmt: skip
CAT_STATTESTS = ("chisquare", "z", "fisher_exact", "g_test", "TVD", "jensenshannon", "kl_div", "psi", "hellinger")
# Fields a retraining entrypoint may use.
RETRAIN_FIELDS = ("window_path", "run_dir", "reason")


def _check_stattest(value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown stat test {value!r}; one of {', '.join(allowed)}")
    return value


class MonitorConfig(Section):
    """The drift-monitor actor that reads the serving stream."""

    enabled: bool = True
    actor_name: str = "fabric-drift-monitor"
    """Name of the monitor actor in Ray's ``fabric`` namespace; serving replicas find it by this name."""
    detached: bool = True
    """Let the actor outlive the process that started it (a job driver or a Serve replica).

    ``fabric.monitor.stop(cfg)`` ends it; with False it ends with its creator.
    """
    window_size: int = Field(default=500, ge=10)
    """Rows of the rolling window compared with the reference (the newest are kept)."""
    min_samples: int = Field(default=30, ge=1)
    """Fewest rows in the window before drift is computed (fewer: a result with status ``insufficient_data``)."""
    sample_rate: float = Field(default=1.0, gt=0, le=1)
    """Share of served rows that replicas send to the monitor (sampled in the replica, before sending)."""
    batch_interval_s: float = Field(default=0.25, ge=0)
    """Seconds a replica gathers served rows before handing them to the monitor in one call (or sooner, at
    ``batch_rows``); 0 sends each request's rows on their own (an actor call costs more than a cheap model)."""
    batch_rows: int = Field(default=512, ge=1)
    """Rows gathered at most before they are sent."""
    queue_size: int = Field(default=1000, ge=1)
    """Submissions a replica may have in flight to the actor; past it new samples are dropped and counted."""
    interval_s: float = Field(default=60.0, gt=0)
    """Seconds between scheduled drift computations (``compute`` on demand runs at any time)."""
    drift_share_threshold: float = Field(default=0.5, gt=0, le=1)
    """Share of drifted columns at which the dataset counts as drifted."""
    prediction_column: str = "prediction"
    """Name of the prediction in the window. Served predictions are compared with each version's own predictions
    on the reference sample (which serving replicas compute and send as they start), else with the reference
    sample's column of this name when it has one; never with the target (labels differ from any imperfect
    model's predictions, which would read as drift)."""
    stattest: str | None = None
    """Evidently stat test for every column whose type it supports; None lets Evidently pick by column type and
    size (K-S or chi-square/Z for references up to 1000 rows, Wasserstein or Jensen-Shannon above)."""
    num_stattest: str | None = None
    """Stat test for numerical columns (over ``stattest``)."""
    cat_stattest: str | None = None
    """Stat test for categorical columns (over ``stattest``)."""
    stattest_threshold: float | None = Field(default=None, gt=0)
    """Threshold of the stat test (a p-value or a distance); None uses the test's own default."""
    webhook_url: str | None = None
    """POSTed a JSON body ``{"event": "drift", "monitor": name, "result": {...}}`` when drift starts."""
    webhook_timeout_s: float = Field(default=2.0, gt=0)
    checkpoint_path: str | None = None
    """Where the actor checkpoints its window, reference and counters; None: ``<run_dir>/monitor/state.pkl``.
    On a multi-node cluster use shared storage (a path every node sees, or a pyarrow URI such as s3://...)."""
    checkpoint_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between checkpoints while new rows arrive (at most this much of the window is lost on a crash)."""
    retrain: bool = False
    """Close the loop: when drift starts, write the window as parquet and submit ``retrain_entrypoint`` as a
    Ray job."""
    retrain_entrypoint: str = "python jobs/train.py data.source={window_path} run_dir={run_dir}"
    """Shell command of the retraining job; ``{window_path}``, ``{run_dir}`` and ``{reason}`` are filled in."""
    retrain_working_dir: str | None = None
    """``runtime_env.working_dir`` of the retraining job; None when the cluster's image has the code."""
    retrain_address: str | None = None
    """Ray Job API address (``http://head:8265``); None: RAY_API_SERVER_ADDRESS, RAY_ADDRESS or the local head."""
    retrain_cooldown_s: float = Field(default=3600.0, ge=0)
    """Fewest seconds between two retraining jobs."""

    @field_validator("stattest")
    @classmethod
    def _stattest_known(cls, v: str | None) -> str | None:
        return _check_stattest(v, tuple(dict.fromkeys(NUM_STATTESTS + CAT_STATTESTS)))

    @field_validator("num_stattest")
    @classmethod
    def _num_stattest_known(cls, v: str | None) -> str | None:
        return _check_stattest(v, NUM_STATTESTS)

    @field_validator("cat_stattest")
    @classmethod
    def _cat_stattest_known(cls, v: str | None) -> str | None:
        return _check_stattest(v, CAT_STATTESTS)

    @field_validator("retrain_entrypoint")
    @classmethod
    def _entrypoint_fields(cls, v: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a format string: {e}") from None
        unknown = sorted(names - set(RETRAIN_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(RETRAIN_FIELDS)}")
        return v
