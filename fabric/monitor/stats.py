"""Drift statistics: pure functions over pandas, and the Evidently calls.

The JSON result comes from Evidently's statistical tests called per column: the same tests, the same
automatic choice by column type and size, and the same thresholds as Evidently's ``DataDriftPreset``, without
the preset's widget rendering (which costs about 70x more; see ``benchmarks/drift.py``). The HTML report is
Evidently's ``Report([DataDriftPreset()])`` over the same frames and options.

Categorical values are compared as normalised strings (``1``, ``1.0`` and ``"1"`` are one category), so a
window built from JSON requests matches a reference read from parquet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fabric.errors import require

if TYPE_CHECKING:
    import pandas as pd

ColumnKind = Literal["num", "cat"]
# Evidently's column types the monitor compares; text, datetime and lists are listed as skipped.
_KINDS = {"num": "Numerical", "cat": "Categorical"}


@dataclass(frozen=True)
class DriftOptions:
    """Which stat test and threshold each column gets, and when the dataset counts as drifted."""

    stattest: str | None = None
    num_stattest: str | None = None
    cat_stattest: str | None = None
    threshold: float | None = None
    drift_share: float = 0.5

    @classmethod
    def from_config(cls, cfg: Any) -> DriftOptions:
        """Build from a ``MonitorConfig``."""
        return cls(
            stattest=cfg.stattest,
            num_stattest=cfg.num_stattest,
            cat_stattest=cfg.cat_stattest,
            threshold=cfg.stattest_threshold,
            drift_share=cfg.drift_share_threshold,
        )

    def method_for(self, kind: ColumnKind) -> str | None:
        """The configured test for a column kind: the per-kind test, else the global one if it applies."""
        from fabric.config.monitor import CAT_STATTESTS, NUM_STATTESTS

        own = self.num_stattest if kind == "num" else self.cat_stattest
        if own is not None:
            return own
        if self.stattest is not None and self.stattest in (NUM_STATTESTS if kind == "num" else CAT_STATTESTS):
            return self.stattest
        return None


# --------------------------------------------------------------------------- Evidently import


def _patch_pandas() -> None:
    """Evidently 0.7.23 imports ``pandas.core.dtypes.common.infer_dtype_from_object``, gone in pandas 3.

    It uses it only in a legacy column-type test the monitor never runs; put back pandas 2's behaviour so
    the import works on the pinned pandas.
    """
    import numpy as np
    import pandas.core.dtypes.common as common

    if hasattr(common, "infer_dtype_from_object"):
        return

    def infer_dtype_from_object(dtype: Any) -> type:
        if isinstance(dtype, type) and issubclass(dtype, np.generic):
            return dtype
        try:
            dtype = common.pandas_dtype(dtype)
        except TypeError:
            pass
        numpy_dtype = getattr(dtype, "numpy_dtype", None)
        if numpy_dtype is not None:
            return numpy_dtype.type
        if hasattr(dtype, "type"):
            return dtype.type
        return np.dtype(dtype).type

    common.infer_dtype_from_object = infer_dtype_from_object  # type: ignore[attr-defined]


def evidently() -> Any:
    """Import Evidently (seconds, once per process) or raise MissingExtraError naming ``fabric[monitor]``."""
    _patch_pandas()
    return require("evidently", "monitor")


def _stattests() -> Any:
    evidently()
    return require("evidently.legacy.calculations.stattests", "monitor")


# --------------------------------------------------------------------------- columns


def infer_kinds(reference: pd.DataFrame, columns: Sequence[str]) -> tuple[dict[str, ColumnKind], dict[str, str]]:
    """Each column's kind as Evidently infers it from the reference sample.

    Returns:
        ``({column: "num" | "cat"}, {skipped column: Evidently's type})``; text, datetime, list and unknown
        columns are skipped.
    """
    evidently()
    from evidently.core.datasets import infer_column_type

    kinds: dict[str, ColumnKind] = {}
    skipped: dict[str, str] = {}
    for col in columns:
        ctype = infer_column_type(reference[col]).value
        if ctype == "num":
            kinds[col] = "num"
        elif ctype == "cat":
            kinds[col] = "cat"
        else:
            skipped[col] = ctype
    return kinds, skipped


def category_key(value: Any) -> str | None:
    """A categorical value as a string key: ``1``, ``1.0``, ``np.int64(1)`` and ``"1"`` all give ``"1"``."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def align(series: pd.Series, kind: ColumnKind) -> pd.Series:
    """A column as the tests compare it: floats (unparseable -> NaN) or string category keys (missing -> NaN)."""
    import pandas as pd

    if kind == "num":
        return pd.to_numeric(series, errors="coerce").astype("float64")
    return series.map(category_key, na_action="ignore").astype(object)


def prediction_value(p: Any) -> Any:
    """A prediction as one scalar: class scores or probabilities (a sequence) give their argmax."""
    if hasattr(p, "tolist"):
        p = p.tolist()
    if isinstance(p, (list, tuple)):
        if len(p) == 1:
            return prediction_value(p[0])
        if not p:
            return None
        return max(range(len(p)), key=lambda i: p[i])
    return p


# --------------------------------------------------------------------------- drift of one column


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def column_drift(
    reference: pd.Series,
    current: pd.Series,
    kind: ColumnKind,
    *,
    method: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Drift of one column between the reference and the current window, with Evidently's stat tests.

    Args:
        reference: the reference values (already ``align``-ed).
        current: the window's values (already ``align``-ed).
        kind: ``"num"`` or ``"cat"``.
        method: an Evidently stat test name (``"ks"``, ``"chisquare"``, ``"psi"``, ...); None: Evidently's
            default for the kind and sizes.
        threshold: the test's threshold; None: its default.

    Returns:
        ``{"score", "test", "threshold", "drifted", "kind"}``; ``score`` is a p-value or a distance
        depending on the test (None when not finite), and ``drifted`` is the test's own verdict.
    """
    stattests = _stattests()
    import numpy as np
    from evidently.legacy.core import ColumnType

    ref = reference.replace([np.inf, -np.inf], np.nan).dropna()
    cur = current.replace([np.inf, -np.inf], np.nan).dropna()
    ftype = ColumnType(kind)
    if ref.empty or cur.empty:
        return {"score": None, "test": method, "threshold": threshold, "drifted": False, "kind": kind,
                "skipped": "no values in the " + ("reference" if ref.empty else "window")}  # fmt: skip
    test = stattests.get_stattest(ref, cur, ftype, method)
    result = test(ref, cur, ftype, threshold)
    return {
        "score": _finite(result.drift_score),
        "test": test.name,
        "threshold": float(result.actual_threshold),
        "drifted": bool(result.drifted),
        "kind": kind,
    }


# --------------------------------------------------------------------------- the whole window


def empty_result(status: str, window_size: int, reference_size: int, **extra: Any) -> dict[str, Any]:
    """A drift result: with no comparison (``status`` says why), or ``extra`` filling in the comparison.

    Every result says when it was computed (``computed_at``, epoch seconds, and ``computed_at_utc``) and over
    how many rows (``window_size`` served rows against ``reference_size`` reference rows).
    """
    out = {
        "status": status,
        "drift_detected": False,
        "dataset_drift": False,
        "drift_share": 0.0,
        "drift_share_threshold": None,
        "drifted_columns": [],
        "number_of_columns": 0,
        "columns": {},
        "prediction": None,
        "skipped_columns": {},
        "window_size": window_size,
        "reference_size": reference_size,
        "computed_at": time.time(),
        **extra,
    }
    out["computed_at_utc"] = datetime.fromtimestamp(out["computed_at"], UTC).isoformat(timespec="seconds")
    return out


def prediction_drift(
    pairs: Mapping[str, tuple[pd.Series, pd.Series]],
    kind: ColumnKind,
    *,
    options: DriftOptions | None = None,
    min_rows: int = 1,
) -> dict[str, Any] | None:
    """Drift of the served predictions against the model's own predictions on the reference, per version.

    Args:
        pairs: version -> (that version's predictions on the reference sample, its predictions in the window).
        kind: ``"cat"`` (classes) or ``"num"`` (regression values).
        options: tests and thresholds, as for the features.
        min_rows: fewest window rows of a version for it to be compared (fewer: listed under ``skipped``).

    Returns:
        None when no version has predictions on the reference; else the comparison of the version with the
        most window rows (``score``, ``test``, ``threshold``, ``kind``, ``version``, ``window_rows``), with
        ``drifted`` true when any version drifted, every version's comparison under ``versions`` and the
        versions not compared under ``skipped``.
    """
    if not pairs:
        return None
    options = options or DriftOptions()
    versions: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for version, (ref, cur) in pairs.items():
        cur = cur.dropna()
        if len(cur) < min_rows:
            skipped[version] = f"{len(cur)} rows in the window, {min_rows} needed"
            continue
        res = column_drift(align(ref, kind), align(cur, kind), kind, method=options.method_for(kind),
                           threshold=options.threshold)  # fmt: skip
        if "skipped" in res:
            skipped[version] = res.pop("skipped")
            continue
        versions[version] = {**res, "window_rows": len(cur), "reference_rows": len(ref)}
    if not versions:
        return {"drifted": False, "score": None, "test": None, "threshold": None, "kind": kind, "version": None,
                "window_rows": 0, "versions": {}, "skipped": skipped}  # fmt: skip
    main = max(versions, key=lambda v: versions[v]["window_rows"])
    return {
        **versions[main],
        "drifted": any(r["drifted"] for r in versions.values()),
        "version": main,
        "versions": versions,
        "skipped": skipped,
    }


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    kinds: Mapping[str, ColumnKind],
    *,
    predictions: Mapping[str, tuple[pd.Series, pd.Series]] | None = None,
    prediction_kind: ColumnKind = "cat",
    min_prediction_rows: int = 1,
    options: DriftOptions | None = None,
    skipped: Mapping[str, str] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Data drift per feature column and prediction drift, as one JSON-ready dict.

    Args:
        reference: the reference frame (feature columns).
        current: the window frame, same columns.
        kinds: feature column -> ``"num"`` / ``"cat"``.
        predictions: version -> (the model's predictions on the reference, the window's predictions), see
            ``prediction_drift``; reported apart and not counted in ``drift_share``.
        prediction_kind: how predictions are compared (``"cat"`` for classes).
        min_prediction_rows: fewest window rows of a version for its predictions to be compared.
        options: tests, thresholds and the dataset drift share; defaults to Evidently's.
        skipped: columns left out of the comparison, with why (reported as is).
        now: the timestamp written as ``computed_at``.

    Returns:
        ``{"status": "ok", "drift_detected", "dataset_drift", "drift_share", "drift_share_threshold",
        "drifted_columns", "number_of_columns", "columns": {name: {"score", "test", "threshold",
        "drifted", "kind"}}, "prediction": {...} | None, "skipped_columns", "window_size",
        "reference_size", "computed_at", "computed_at_utc", "duration_s"}``. ``dataset_drift`` is
        ``drift_share >= drift_share_threshold``; ``drift_detected`` is dataset drift or prediction drift.
    """
    import pandas as pd

    options = options or DriftOptions()
    start = time.perf_counter()
    columns: dict[str, dict[str, Any]] = {}
    skipped_out = dict(skipped or {})
    missing = pd.Series([], dtype=object)
    for col, kind in kinds.items():
        res = column_drift(
            align(reference[col], kind),
            align(current[col] if col in current else missing, kind),
            kind,
            method=options.method_for(kind),
            threshold=options.threshold,
        )
        if "skipped" in res:
            skipped_out[col] = res["skipped"]
        else:
            columns[col] = res
    pred = prediction_drift(predictions or {}, prediction_kind, options=options, min_rows=min_prediction_rows)
    drifted = [c for c, r in columns.items() if r["drifted"]]
    share = len(drifted) / len(columns) if columns else 0.0
    dataset_drift = bool(columns) and share >= options.drift_share
    return empty_result(
        "ok",
        len(current),
        len(reference),
        drift_detected=dataset_drift or bool(pred and pred["drifted"]),
        dataset_drift=dataset_drift,
        drift_share=share,
        drift_share_threshold=options.drift_share,
        drifted_columns=drifted,
        number_of_columns=len(columns),
        columns=columns,
        prediction=pred,
        skipped_columns=skipped_out,
        computed_at=time.time() if now is None else now,
        duration_s=time.perf_counter() - start,
    )


def _summary_html(result: Mapping[str, Any], name: str) -> str:
    """fabric's summary of a drift result: the numbers ``GET /monitor/drift`` gives, and the result as JSON."""
    import html
    import json

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c)}</td><td>{e(str(r['test']))}</td><td>{r['score']}</td><td>{r['threshold']}</td>"
        f"<td>{'yes' if r['drifted'] else 'no'}</td></tr>"
        for c, r in result["columns"].items()
    )
    pred = result.get("prediction")
    if pred and pred.get("versions"):
        pred_text = "; ".join(
            f"version {e(v)}: {e(str(r['test']))} {r['score']} (threshold {r['threshold']}, {r['window_rows']} rows)"
            f" {'drifted' if r['drifted'] else 'not drifted'}"
            for v, r in pred["versions"].items()
        )
    else:
        pred_text = "not compared (no model predictions on the reference sample)"
    data = json.dumps(result, default=str).replace("</", "<\\/")
    return (
        f'<section id="fabric-drift-summary" style="font-family:sans-serif;margin:1em">'
        f"<h2>Drift monitor {e(name)}</h2>"
        f"<p>Computed at {e(result['computed_at_utc'])} over {result['window_size']} served rows against "
        f"{result['reference_size']} reference rows.</p>"
        f"<p><b>{len(result['drifted_columns'])} of {result['number_of_columns']} columns drifted</b> "
        f"(share {result['drift_share']:.3f}, threshold {result['drift_share_threshold']}); dataset drift: "
        f"{'yes' if result['dataset_drift'] else 'no'}; drift detected: {'yes' if result['drift_detected'] else 'no'}.</p>"
        f"<p>Prediction drift (served predictions against the model's predictions on the reference): {pred_text}.</p>"
        f"<table border=1 cellpadding=4><tr><th>column</th><th>test</th><th>score</th><th>threshold</th>"
        f"<th>drifted</th></tr>{rows}</table>"
        f"<p>Below: Evidently's report of the same window, columns, tests and thresholds.</p></section>"
        f'<script type="application/json" id="fabric-drift-result">{data}</script>'
    )


def _numeric_test(name: str | None) -> bool:
    """True when Evidently's stat test ``name`` applies to numerical columns (None: Evidently picks one that does)."""
    if name is None:
        return True
    _stattests()
    from evidently.legacy.calculations.stattests.registry import StatTestInvalidFeatureTypeError, get_registered_stattest
    from evidently.legacy.core import ColumnType

    try:
        get_registered_stattest(name, ColumnType.Numerical)
    except StatTestInvalidFeatureTypeError:
        return False
    return True


def evidently_snapshot(
    reference: pd.DataFrame, current: pd.DataFrame, result: Mapping[str, Any], kinds: Mapping[str, ColumnKind]
) -> Any:
    """Evidently's ``DataDriftPreset`` run over a drift result's window and compared columns, each with the test
    and threshold the result used, and the result's dataset drift share: it reaches the result's verdicts.

    The prediction is not among its columns (it does not count in the share). Returns the snapshot, or None
    when the result compared no column.
    """
    ev = evidently()
    import pandas as pd
    from evidently.presets import DataDriftPreset

    cols = list(result["columns"])
    if not cols:
        return None
    ref_df = pd.DataFrame({c: align(reference[c], kinds[c]) for c in cols})
    cur_df = pd.DataFrame({c: align(current[c], kinds[c]) for c in cols})
    # A numeric column with few values gets a categorical test (Evidently's choice, e.g. chisquare), which the
    # report runs only on columns it is told are categorical.
    numerical = [c for c in cols if kinds[c] == "num" and _numeric_test(result["columns"][c]["test"])]
    definition = ev.DataDefinition(
        numerical_columns=numerical,
        categorical_columns=[c for c in cols if c not in numerical],
    )
    preset = DataDriftPreset(
        columns=cols,
        drift_share=result["drift_share_threshold"],
        per_column_method={c: result["columns"][c]["test"] for c in cols},
        per_column_threshold={c: result["columns"][c]["threshold"] for c in cols},
    )
    return ev.Report([preset]).run(
        ev.Dataset.from_pandas(cur_df, data_definition=definition),
        ev.Dataset.from_pandas(ref_df, data_definition=definition),
    )


def report_html(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    result: Mapping[str, Any],
    kinds: Mapping[str, ColumnKind],
    *,
    name: str = "",
) -> str:
    """The HTML report of a drift result: fabric's summary of it, then Evidently's report (``evidently_snapshot``)
    of the same window, columns, tests and thresholds, so both parts tell the same numbers."""
    summary = _summary_html(result, name)
    snapshot = evidently_snapshot(reference, current, result, kinds)
    if snapshot is None:
        return f"<html><body>{summary}</body></html>"
    page = snapshot.get_html_str(as_iframe=False)
    at = page.lower().find("<body")
    at = page.find(">", at) + 1 if at >= 0 else 0
    return page[:at] + summary + page[at:]
