"""The engine-facing logic of the tabular endpoint: decode, route, predict, encode (no HTTP, no Ray).

:class:`TabularService` turns a request body into a feature matrix (tensor or named-column input), picks
the version (traffic split, or the version the URL pins), runs it through that version's
:class:`~fabric.serve.batching.Predictor`, and encodes the OIP response. Every problem with the input is
a :class:`~fabric.serve.protocol.ProtocolError` with its 4xx status. The Serve deployment and the bare
benchmark server both wrap this same class, so they serve identical bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fabric.errors import DataValidationError
from fabric.serve.batching import Predictor
from fabric.serve.engines import LoadedVersion, ModelSchema
from fabric.serve.monitor_hook import MonitorHook, NoMonitor
from fabric.serve.protocol import (
    NUMERIC,
    InferenceRequest,
    ProtocolError,
    RecordsRequest,
    RequestInput,
    decode_tensor,
    invalid,
    output,
    parse_body,
)
from fabric.serve.router import TrafficSplit

SERVER_NAME = "fabric"


@dataclass
class Version:
    """A loaded version and the predictor (batcher) in front of its engine."""

    loaded: LoadedVersion
    predictor: Predictor

    @property
    def schema(self) -> ModelSchema:
        return self.loaded.schema


# --------------------------------------------------------------------------- input -> features


def _tensor_features(schema: ModelSchema, inp: RequestInput, where: str) -> np.ndarray:
    n = schema.n_features
    if inp.datatype not in NUMERIC:
        raise invalid(
            f"{where} ({inp.name!r}) must be a numeric tensor (e.g. FP32), got {inp.datatype}",
            "invalid_datatype",
            f"{where}.datatype",
        )
    if len(inp.shape) != 2 or inp.shape[1] != n:
        raise invalid(
            f"{where} ({inp.name!r}) must have shape [rows, {n}] (one column per encoded feature), got {inp.shape}",
            "invalid_shape",
            f"{where}.shape",
        )
    if inp.shape[0] == 0:
        raise invalid(f"{where} ({inp.name!r}) has no rows", "invalid_shape", f"{where}.shape")
    x = decode_tensor(inp, where).astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        r, c = (int(i) for i in np.argwhere(~finite)[0])
        raise invalid(
            f"{where} row {r} feature {schema.feature_names[c]!r} is {x[r, c]}; encoded features must be finite numbers",
            "invalid_value",
            f"{where}.data",
        )
    return x


def _encoded_from_frame(schema: ModelSchema, df: Any, root: str) -> np.ndarray:
    """Named input without a preprocessor: the columns are the encoded features themselves."""
    import pandas as pd

    out = np.empty((len(df), schema.n_features), dtype=np.float32)
    for j, name in enumerate(schema.feature_names):
        col = df[name]
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        present = col.notna().to_numpy()
        if (present & np.isnan(values)).any():
            row = int(np.flatnonzero(present & np.isnan(values))[0])
            raise invalid(
                f"feature {name!r} must be numeric; row {row} holds {col.iloc[row]!r}",
                "invalid_datatype",
                f"{root}.{name}",
            )
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise invalid(
                f"feature {name!r} is null or not finite in row {row}; encoded features must be finite numbers",
                "invalid_value",
                f"{root}.{name}",
            )
        out[:, j] = values
    return out


def _check_present(columns: list[str], present: Iterable[str] | Mapping[str, Any], where: str) -> None:
    """422 naming the first of ``columns`` that ``present`` lacks (a record's keys or a frame's columns)."""
    have = present if isinstance(present, Mapping) else set(present)
    missing = [c for c in columns if c not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise invalid(
            f"{where} lacks feature {missing[0]!r}{more}; expected: {', '.join(columns)}",
            "missing_feature",
            f"{where}.{missing[0]}",
        )


def feature_range(schema: ModelSchema) -> tuple[np.ndarray, np.ndarray] | None:
    """The range of each encoded feature seen in training (from the preprocessor's training statistics).

    A numeric column's is its training min and max, scaled as the preprocessor scales it; a one-hot feature's
    is [0, 1]. None when the model has no preprocessor, or it records no numeric column's min and max.
    """
    pre = schema.preprocessor
    if pre is None:
        return None
    lo: list[float] = []
    hi: list[float] = []
    known = False
    for col in pre.columns:
        stats = getattr(col, "stats", None)
        if stats is None:  # categorical: one-hot
            lo.extend([0.0] * len(col.feature_names))
            hi.extend([1.0] * len(col.feature_names))
            continue
        mn, mx = stats.get("min"), stats.get("max")
        known = known or (mn is not None and mx is not None)
        lo.append((mn - col.center) / col.scale if mn is not None else -np.inf)
        hi.append((mx - col.center) / col.scale if mx is not None else np.inf)
    if not known:
        return None

    def widened(bound: np.ndarray, sign: float) -> np.ndarray:
        # float32 rounding of the extreme training values' features must not count as outside
        return bound + sign * 1e-4 * (1.0 + np.abs(np.where(np.isfinite(bound), bound, 0.0)))

    return widened(np.asarray(lo), -1.0), widened(np.asarray(hi), 1.0)


@dataclass
class Features:
    """What a request's input comes to: the feature matrix, and what the response and the monitor learn of it."""

    x: np.ndarray
    rows: list[dict[str, Any]] | None = None
    """The raw rows, for the monitor (named-column input only)."""
    ignored: list[str] | None = None
    """Columns the request sent that the model does not read (reported in the response)."""
    out_of_range: dict[str, int] | None = None
    """Tensor input: feature -> rows with a value outside the training range (None when not checked)."""
    flagged_rows: int = 0
    """Tensor input: rows with any feature outside the training range."""


class TabularService:
    """Serves the versions of one tabular model under one OIP model name.

    Args:
        model_name: the name in ``/v2/models/{name}``.
        versions: version name -> loaded version with its predictor.
        split: the traffic split over ``versions``.
        monitor: the drift-monitor hook (a no-op when monitoring is off).
        not_null: raw columns the data schema forbids nulls in (``data.expectations.not_null``).
        impute_nulls: accept nulls in every column (``serve.impute_nulls``); otherwise a null in a column the
            training data held no nulls in is a 422.
    """

    def __init__(
        self,
        model_name: str,
        versions: Mapping[str, Version],
        split: TrafficSplit,
        monitor: MonitorHook | None = None,
        not_null: Iterable[str] = (),
        impute_nulls: bool = False,
    ) -> None:
        self.model_name = model_name
        self.versions = dict(versions)
        self.split = split
        self.monitor = monitor or NoMonitor()
        self._observe = not isinstance(self.monitor, NoMonitor)
        self.not_null = list(not_null)
        self.impute_nulls = impute_nulls
        self._ranges = {v: feature_range(rt.schema) for v, rt in self.versions.items()}
        self.responses: Counter[tuple[str, int]] = Counter()
        """(version, HTTP status) -> inference responses (version ``-`` when none was chosen)."""

    # ------------------------------------------------------------------ metadata

    def check_model(self, name: str, version: str | None = None) -> None:
        """Raise 404 for a model name (or version) this server does not serve."""
        if name != self.model_name:
            raise ProtocolError(
                404, f"unknown model {name!r}; this server serves {self.model_name!r}", "unknown_model", "name"
            )
        if version is not None and version not in self.versions:
            raise ProtocolError(
                404,
                f"unknown version {version!r} of {name!r}; versions: {', '.join(self.versions)}",
                "unknown_version",
                "version",
            )

    def ready(self) -> bool:
        return bool(self.versions)

    def server_metadata(self) -> dict[str, Any]:
        from fabric import __version__

        return {"name": SERVER_NAME, "version": __version__, "extensions": ["statistics"]}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """OIP model metadata; ``parameters`` adds the task, raw columns and the traffic split."""
        self.check_model(name, version)
        v = self.versions[version] if version else next(iter(self.versions.values()))
        s = v.schema
        if s.task == "classification":
            k = max(s.output_dim, 2)
            outputs = [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            ]
        else:
            shape = [-1] if s.output_dim == 1 else [-1, s.output_dim]
            outputs = [{"name": "prediction", "datatype": "FP32", "shape": shape}]
        return {
            "name": self.model_name,
            "versions": [version] if version else list(self.versions),
            "platform": v.loaded.engine.platform,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, s.n_features]}],
            "outputs": outputs,
            "parameters": {
                "task": s.task,
                "feature_names": s.feature_names,
                "input_columns": s.input_columns,
                "preprocessor": s.preprocessor is not None,
                "traffic": self.split.weights,
                "sticky_header": self.split.sticky_header,
            },
        }

    def statistics(self, name: str) -> dict[str, Any]:
        """Per-version counters of this replica (a subset of Triton's statistics extension)."""
        self.check_model(name)
        return {
            "model_stats": [
                {"name": self.model_name, "version": v, **rt.predictor.stats.as_dict()}
                for v, rt in self.versions.items()
            ]
        }

    # ------------------------------------------------------------------ inference

    def features(self, version: str, req: InferenceRequest | RecordsRequest) -> Features:
        """The float32 feature matrix a request describes for ``version``, with what the response and the
        monitor learn of the input (raw rows, ignored columns, values outside the training range)."""
        schema = self.versions[version].schema
        if isinstance(req, RecordsRequest):
            import pandas as pd

            cols = schema.input_columns
            for i, rec in enumerate(req.instances):
                _check_present(cols, rec, f"instances[{i}]")
            df = pd.DataFrame.from_records(req.instances)
            x = self._from_frame(schema, df, "instances", lambda r, c: f"instances[{r}].{c}")
            known = set(cols)
            ignored = [c for c in df.columns if c not in known]
            # the records are the raw rows already: cheaper than a DataFrame's to_dict
            rows = [{c: rec[c] for c in cols} for rec in req.instances] if self._observe else None
            return Features(x, rows, ignored or None)

        inputs = req.inputs
        known = set(schema.input_columns)
        first = inputs[0]
        if len(inputs) == 1 and (
            first.name not in known or (len(first.shape) == 2 and first.shape[1] == schema.n_features > 1)
        ):
            return self._tensor(version, schema, first)
        unknown = [i.name for i in inputs if i.name not in known]
        if unknown:
            raise invalid(
                f"unknown input(s) {', '.join(map(repr, unknown))}: send one tensor of shape [rows, {schema.n_features}] "
                f"or one input per column ({', '.join(schema.input_columns)})",
                "unknown_input",
                f"inputs[{[i.name for i in inputs].index(unknown[0])}].name",
            )
        import pandas as pd

        columns: dict[str, np.ndarray] = {}
        index: dict[str, int] = {}
        rows: int | None = None
        for idx, inp in enumerate(inputs):
            where = f"inputs[{idx}]"
            if not (len(inp.shape) == 1 or (len(inp.shape) == 2 and inp.shape[1] == 1)):
                raise invalid(
                    f"{where} (column {inp.name!r}) must have shape [rows] or [rows, 1], got {inp.shape}",
                    "invalid_shape",
                    f"{where}.shape",
                )
            values = decode_tensor(inp, where).reshape(-1)
            if rows is not None and len(values) != rows:
                raise invalid(
                    f"{where} (column {inp.name!r}) has {len(values)} rows, the inputs before it {rows}",
                    "invalid_shape",
                    f"{where}.shape",
                )
            rows = len(values)
            columns[inp.name] = values
            index[inp.name] = idx
        df = pd.DataFrame(columns)
        x = self._from_frame(schema, df, "inputs", lambda r, c: f"inputs[{index[c]}].data[{r}]")
        return Features(x, df[schema.input_columns].to_dict("records") if self._observe else None)

    def _tensor(self, version: str, schema: ModelSchema, inp: RequestInput) -> Features:
        x = _tensor_features(schema, inp, "inputs[0]")
        bounds = self._ranges.get(version)
        if bounds is None:
            return Features(x)
        outside = (x < bounds[0]) | (x > bounds[1])
        flagged = outside.any(axis=1)
        if not flagged.any():
            return Features(x, out_of_range={}, flagged_rows=0)
        counts = outside.sum(axis=0)
        names = schema.feature_names
        return Features(
            x,
            out_of_range={names[j]: int(counts[j]) for j in np.flatnonzero(counts)},
            flagged_rows=int(flagged.sum()),
        )

    def _check_values(self, schema: ModelSchema, df: Any, loc: Callable[[int, str], str]) -> None:
        """422 for a null in a column the training data had none in (unless ``impute_nulls``), or a string in
        a numeric column, naming the row and the column (``loc(row, column)`` says where in the request)."""
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        pre = schema.preprocessor
        if pre is not None:
            numeric = {c.name for c in pre.columns if getattr(c, "stats", None) is not None}
            nullable = set(pre.nullable or ())
        else:  # the columns are the encoded features: numbers, never null
            numeric, nullable = set(schema.feature_names), set()
        cols = schema.input_columns
        if not self.impute_nulls:
            nulls = df[cols].isna().to_numpy()  # one pass over the frame: the common case has none
            for j in np.flatnonzero(nulls.any(axis=0)):
                col = cols[j]
                if col in nullable:
                    continue
                r = int(np.flatnonzero(nulls[:, j])[0])
                why = (
                    "the training data had no nulls in it"
                    if pre is not None and pre.nullable is not None
                    else "the model records no nulls in its training data"
                )
                raise invalid(
                    f"{loc(r, col)}: row {r}, column {col!r} is null and {why}; send a value, or set "
                    "serve.impute_nulls=true to fill nulls as training did",
                    "invalid_value",
                    loc(r, col),
                )
        for col in cols:
            s = df[col]
            if col in numeric and not (is_numeric_dtype(s.dtype) or is_bool_dtype(s.dtype)):
                strings = np.fromiter((isinstance(v, str) for v in s), dtype=bool, count=len(s))
                if strings.any():
                    r = int(np.flatnonzero(strings)[0])
                    raise invalid(
                        f"{loc(r, col)}: row {r}, column {col!r} is numeric but holds the string {s.iloc[r]!r}; "
                        "send a JSON number",
                        "invalid_datatype",
                        loc(r, col),
                    )

    def _from_frame(self, schema: ModelSchema, df: Any, root: str, loc: Callable[[int, str], str]) -> np.ndarray:
        if len(df) == 0:
            raise invalid(f"{root} has no rows", "invalid_shape", root)
        _check_present(schema.input_columns, df.columns, root)
        for col in self.not_null:
            if col in df.columns and col in schema.input_columns:
                nulls = df[col].isna().to_numpy()
                if nulls.any():
                    r = int(np.flatnonzero(nulls)[0])
                    raise invalid(
                        f"feature {col!r} is null in row {r}, which the data schema forbids "
                        "(data.expectations.not_null)",
                        "invalid_value",
                        loc(r, col),
                    )
        self._check_values(schema, df, loc)
        if schema.preprocessor is not None:
            try:
                x = schema.preprocessor.transform(df)
            except DataValidationError as e:
                first = str(e).split("\n")[0]
                kind = "missing_feature" if "lacks column" in first else "invalid_value"
                raise invalid(first, kind, f"{root}.{e.column}" if e.column else root) from None
        else:
            x = _encoded_from_frame(schema, df, root)
        return np.ascontiguousarray(x, dtype=np.float32)

    def reference_predictions(self, frame: Any, versions: Iterable[str]) -> dict[str, list[Any]]:
        """Each version's predictions on a frame of raw reference rows, as the monitor compares them.

        The rows go through the preprocessor as in training (nulls filled), not through the strict checks of
        requests, and the engine in chunks.
        """
        out: dict[str, list[Any]] = {}
        for version in versions:
            rt = self.versions[version]
            schema = rt.schema
            missing = [c for c in schema.input_columns if c not in frame.columns]
            if missing:
                raise DataValidationError(
                    f"the monitor's reference lacks the model's input column {missing[0]!r}", column=missing[0]
                )
            if schema.preprocessor is not None:
                x = schema.preprocessor.transform(frame)
            else:
                x = _encoded_from_frame(schema, frame, "reference")
            x = np.ascontiguousarray(x, dtype=np.float32)
            ys = [rt.loaded.engine.predict(x[i : i + 1024]) for i in range(0, len(x), 1024)]
            out[version] = monitored_predictions(schema, np.concatenate(ys) if ys else np.zeros((0, 1)))
        return out

    def model_keys(self) -> dict[str, str]:
        """Version -> a key of the model behind it (its folder, engine and files' modification times)."""
        keys = {}
        for v, rt in self.versions.items():
            folder = rt.loaded.folder
            stamp = max((p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()), default=0)
            keys[v] = f"{folder}:{rt.loaded.engine.platform}:{stamp}"
        return keys

    @staticmethod
    def outputs(schema: ModelSchema, y: np.ndarray) -> list[dict[str, Any]]:
        """Model outputs as OIP outputs: ``label`` + ``probabilities`` (classification) or ``prediction``."""
        y = np.asarray(y, dtype=np.float32)
        if y.ndim == 1:
            y = y[:, None]
        if schema.task != "classification":
            return [output("prediction", y[:, 0] if y.shape[1] == 1 else y, "FP32")]
        if y.shape[1] == 1:  # one logit: binary classification
            p1 = 1.0 / (1.0 + np.exp(-y[:, 0]))
            probs = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = np.exp(y - y.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        labels = probs.argmax(axis=1).astype(np.int64)
        return [output("label", labels, "INT64"), output("probabilities", probs.astype(np.float32), "FP32")]

    def choose(self, name: str, version: str | None, headers: Mapping[str, str]) -> str:
        """The version for a request: the pinned one, or the traffic split's choice."""
        self.check_model(name, version)
        return version or self.split.choose(headers)

    async def infer(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> tuple[str, bytes]:
        """Answer one inference request; returns the version that answered and the JSON body.

        Raises:
            ProtocolError: anything wrong with the request (4xx), never for a well-formed one.
        """
        chosen = "-"
        try:
            chosen = self.choose(name, version, headers)
            body = await self._answer(chosen, read_body)
        except ProtocolError as e:
            self.responses[(chosen, e.status)] += 1
            raise
        except Exception:
            self.responses[(chosen, 500)] += 1
            raise
        self.responses[(chosen, 200)] += 1
        return chosen, body

    async def _answer(self, chosen: str, read_body: Callable[[], Awaitable[bytes]]) -> bytes:
        rt = self.versions[chosen]
        policy = rt.predictor.policy
        policy.arrive()  # counted from here, so a batch forming now knows this request is on its way
        try:
            req = parse_body(await read_body())
            feats = self.features(chosen, req)
            x = feats.x
            y = await rt.predictor(x)
            outs = self.outputs(rt.schema, y)
            if req.outputs:
                wanted = [o.name for o in req.outputs]
                have = {o["name"]: o for o in outs}
                unknown = [w for w in wanted if w not in have]
                if unknown:
                    raise invalid(
                        f"unknown output(s) {', '.join(map(repr, unknown))}; outputs: {', '.join(have)}",
                        "unknown_output",
                        "outputs",
                    )
                outs = [have[w] for w in wanted]
            if self._observe:
                if feats.rows:
                    self.monitor.observe(chosen, feats.rows, monitored_predictions(rt.schema, y))
                elif feats.out_of_range is not None:
                    self.monitor.observe_out_of_range(chosen, len(x), feats.flagged_rows, feats.out_of_range)
        finally:
            policy.depart()
        body: dict[str, Any] = {"model_name": self.model_name, "model_version": chosen}
        if req.id is not None:  # OIP: the request's id, when it gave one
            body["id"] = req.id
        params: dict[str, Any] = {}
        if feats.ignored:
            params["ignored_columns"] = feats.ignored
        if feats.flagged_rows:
            params["out_of_range"] = {"rows": feats.flagged_rows, "features": sorted(feats.out_of_range or {})}
        if params:
            body["parameters"] = params
        body["outputs"] = outs
        return json.dumps(body).encode()


def monitored_predictions(schema: ModelSchema, y: np.ndarray) -> list[Any]:
    """Model outputs as the monitor compares them: the class (classification) or the value(s)."""
    y2 = np.asarray(y).reshape(len(y), -1)
    if schema.task == "classification":
        return y2.argmax(axis=1).tolist() if y2.shape[1] > 1 else (y2[:, 0] > 0).astype(int).tolist()
    return y2[:, 0].tolist() if y2.shape[1] == 1 else y2.tolist()


def build_service(
    cfg: Any, batch: Callable[..., Any] | None = None, monitor: MonitorHook | None = None
) -> TabularService:
    """Load every version's engine and build the service (in a replica, or in a bare server).

    Args:
        cfg: the pipeline config (``serve`` decides versions, engine, batching).
        batch: ``ray.serve.batch`` inside a Serve replica; None answers each request on its own.
        monitor: the drift-monitor hook; None builds it from ``cfg.monitor``.
    """
    from fabric.serve.engines import load_version
    from fabric.serve.monitor_hook import monitor_hook
    from fabric.serve.spec import model_name, serving_versions

    s = cfg.serve
    versions: dict[str, Version] = {}
    for v in serving_versions(cfg):
        loaded = load_version(v, cfg)
        versions[v.name] = Version(
            loaded, Predictor(loaded.engine.predict, s.max_batch_size, s.batch_wait_timeout_s, batch)
        )
    split = TrafficSplit({v.name: v.weight for v in serving_versions(cfg)}, s.sticky_header)
    service = TabularService(
        model_name(cfg),
        versions,
        split,
        monitor if monitor is not None else monitor_hook(cfg),
        cfg.data.expectations.not_null,
        s.impute_nulls,
    )
    attach = getattr(service.monitor, "attach_models", None)
    if attach is not None:  # the monitor compares served predictions with these versions' on its reference
        attach(service.model_keys(), service.reference_predictions)
    return service
