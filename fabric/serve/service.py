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


class TabularService:
    """Serves the versions of one tabular model under one OIP model name.

    Args:
        model_name: the name in ``/v2/models/{name}``.
        versions: version name -> loaded version with its predictor.
        split: the traffic split over ``versions``.
        monitor: the drift-monitor hook (a no-op when monitoring is off).
        not_null: raw columns the data schema forbids nulls in (``data.expectations.not_null``).
    """

    def __init__(
        self,
        model_name: str,
        versions: Mapping[str, Version],
        split: TrafficSplit,
        monitor: MonitorHook | None = None,
        not_null: Iterable[str] = (),
    ) -> None:
        self.model_name = model_name
        self.versions = dict(versions)
        self.split = split
        self.monitor = monitor or NoMonitor()
        self._observe = not isinstance(self.monitor, NoMonitor)
        self.not_null = list(not_null)
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

    def features(
        self, schema: ModelSchema, req: InferenceRequest | RecordsRequest
    ) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
        """The float32 feature matrix a request describes, and its raw rows when it was named-column input."""
        if isinstance(req, RecordsRequest):
            import pandas as pd

            cols = schema.input_columns
            for i, rec in enumerate(req.instances):
                _check_present(cols, rec, f"instances[{i}]")
            x, _ = self._from_frame(schema, pd.DataFrame.from_records(req.instances), "instances", keep_rows=False)
            # the records are the raw rows already: cheaper than a DataFrame's to_dict
            return x, [{c: rec[c] for c in cols} for rec in req.instances] if self._observe else None

        inputs = req.inputs
        known = set(schema.input_columns)
        first = inputs[0]
        if len(inputs) == 1 and (
            first.name not in known or (len(first.shape) == 2 and first.shape[1] == schema.n_features > 1)
        ):
            return _tensor_features(schema, first, "inputs[0]"), None
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
        return self._from_frame(schema, pd.DataFrame(columns), "inputs")

    def _from_frame(
        self, schema: ModelSchema, df: Any, root: str, keep_rows: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
        if len(df) == 0:
            raise invalid(f"{root} has no rows", "invalid_shape", root)
        _check_present(schema.input_columns, df.columns, root)
        for col in self.not_null:
            if col in df.columns and col in schema.input_columns:
                nulls = df[col].isna().to_numpy()
                if nulls.any():
                    raise invalid(
                        f"feature {col!r} is null in row {int(np.flatnonzero(nulls)[0])}, which the data schema forbids "
                        "(data.expectations.not_null)",
                        "invalid_value",
                        f"{root}.{col}",
                    )
        if schema.preprocessor is not None:
            try:
                x = schema.preprocessor.transform(df)
            except DataValidationError as e:
                first = str(e).split("\n")[0]
                kind = "missing_feature" if "lacks column" in first else "invalid_value"
                raise invalid(first, kind, f"{root}.{e.column}" if e.column else root) from None
        else:
            x = _encoded_from_frame(schema, df, root)
        rows = df[schema.input_columns].to_dict("records") if self._observe and keep_rows else None
        return np.ascontiguousarray(x, dtype=np.float32), rows

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
        self.responses[(chosen, 200)] += 1
        return chosen, body

    async def _answer(self, chosen: str, read_body: Callable[[], Awaitable[bytes]]) -> bytes:
        rt = self.versions[chosen]
        policy = rt.predictor.policy
        policy.arrive()  # counted from here, so a batch forming now knows this request is on its way
        try:
            req = parse_body(await read_body())
            x, rows = self.features(rt.schema, req)
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
            if self._observe and rows:
                y2 = np.asarray(y).reshape(len(x), -1)
                if rt.schema.task == "classification":
                    preds: list[Any] = (
                        y2.argmax(axis=1).tolist() if y2.shape[1] > 1 else (y2[:, 0] > 0).astype(int).tolist()
                    )
                else:
                    preds = y2[:, 0].tolist() if y2.shape[1] == 1 else y2.tolist()
                self.monitor.observe(chosen, rows, preds)
        finally:
            policy.depart()
        body: dict[str, Any] = {"model_name": self.model_name, "model_version": chosen}
        if req.id is not None:  # OIP: the request's id, when it gave one
            body["id"] = req.id
        body["outputs"] = outs
        return json.dumps(body).encode()


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
    return TabularService(
        model_name(cfg),
        versions,
        split,
        monitor if monitor is not None else monitor_hook(cfg),
        cfg.data.expectations.not_null,
    )
