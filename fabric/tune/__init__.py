"""Search stage: Ray Tune with Optuna (TPE, seeded) and ASHA early stopping around train's loop, or around
XGBoost / LightGBM boosting (ASHA on the per-round reports)."""

from fabric.tune._search import TREE_SPACES, TuneResult, build_param_space, run, search_space

__all__ = ["TREE_SPACES", "TuneResult", "build_param_space", "run", "search_space"]
