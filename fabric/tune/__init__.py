"""Search stage: Ray Tune with Optuna (TPE, seeded) and ASHA early stopping around train's loop."""

from fabric.tune._search import TuneResult, build_param_space, run

__all__ = ["TuneResult", "build_param_space", "run"]
