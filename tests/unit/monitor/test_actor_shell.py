"""The actor shell as a plain object (no Ray): before and after its reference, checkpoints, shutdown."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fabric.config import MonitorConfig
from fabric.monitor.actor import MonitorActor
from tests.unit.monitor._data import make_frame, rows_and_preds


def test_shell_without_reference_answers_and_counts_what_it_cannot_monitor(
    reference: pd.DataFrame, tmp_path: Path
) -> None:
    ckpt = tmp_path / "state.pkl"
    shell = MonitorActor(MonitorConfig(window_size=300, interval_s=3600), str(ckpt))
    try:
        assert shell.drift()["status"] == "no_reference" and shell.stats()["reference_fingerprint"] is None
        rows, preds = rows_and_preds(make_frame(40, seed=1))
        assert shell.add(rows, preds, dropped=2) == 0
        assert shell.checkpoint() is None and not ckpt.exists()

        fingerprint = shell.set_reference(reference, "target", "classification")
        assert ckpt.is_file()  # the reference is durable as soon as it arrives
        assert shell.stats()["dropped"] == 42 and shell.stats()["reference_fingerprint"] == fingerprint
        assert shell.add(rows, preds) == 40
        assert shell.drift(refresh=True)["status"] == "ok"
    finally:
        shell.shutdown()

    again = MonitorActor(MonitorConfig(window_size=300, interval_s=3600), str(ckpt))
    try:
        stats = again.stats()
        assert stats["restored"] and stats["window_size"] == 40 and stats["reference_fingerprint"] == fingerprint
        assert again.drift()["status"] == "ok"  # the last result came back with the checkpoint
    finally:
        again.shutdown()


def test_new_reference_keeps_the_window_and_clears_the_verdict(reference: pd.DataFrame) -> None:
    shell = MonitorActor(MonitorConfig(window_size=300, interval_s=3600))
    try:
        shell.set_reference(reference, "target")
        rows, preds = rows_and_preds(make_frame(300, seed=3, age_shift=15, city_p=[0.8, 0.1, 0.1]))
        shell.add(rows, preds)
        assert shell.compute()["drift_detected"]
        shell.set_reference(make_frame(500, seed=3, age_shift=15, city_p=[0.8, 0.1, 0.1]), "target")
        assert shell.stats()["window_size"] == 300 and not shell.stats()["drift_active"]
        assert not shell.drift()["drift_detected"]  # recomputed against the new reference
    finally:
        shell.shutdown()
