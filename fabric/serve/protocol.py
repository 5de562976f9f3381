"""The wire format: Open Inference Protocol v2 (KServe, Triton, Seldon) models, and error bodies.

Requests are plain pydantic models so the OpenAPI document describes them; decoding tensors into numpy
arrays lives here too, because the rules (datatypes, shapes, row-major data) are the protocol's. Every
problem with a request becomes a :class:`ProtocolError` carrying its HTTP status, never a 500.

See https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ for the protocol.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fabric.errors import FabricError

# OIP datatype -> numpy dtype of the decoded tensor (BYTES are strings, for named raw columns).
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
NUMERIC = frozenset(DATATYPES) - {"BYTES"}

# Response header naming the version that answered (also in the body's ``model_version``).
VERSION_HEADER = "x-fabric-model-version"


# --------------------------------------------------------------------------- errors


class ErrorResponse(BaseModel):
    """Every error body: OIP's ``error`` string, plus a machine-readable kind and where the problem is."""

    error: str
    """What is wrong, naming the input, column or field."""
    type: str
    """A stable kind: ``invalid_json``, ``invalid_request``, ``invalid_shape``, ``invalid_datatype``,
    ``missing_feature``, ``invalid_value``, ``body_too_large``, ``unknown_model``, ``unknown_version``..."""
    loc: str | None = None
    """Where in the request: ``inputs[0].shape``, ``instances[3].age``, a header name."""
    request_id: str | None = None
    """Internal errors (500): the request's id, as in the ``x-request-id`` header and the replica's log line."""


class ProtocolError(FabricError):
    """A request the server cannot serve; carries its HTTP status and renders as :class:`ErrorResponse`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request",
        loc: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type
        self.loc = loc
        self.request_id = request_id
        super().__init__(message)

    def body(self) -> bytes:
        """The JSON error body."""
        body = {"error": self.message, "type": self.type, "loc": self.loc}
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return json.dumps(body).encode()


def invalid(message: str, type: str = "invalid_request", loc: str | None = None) -> ProtocolError:
    """A 422: well-formed JSON that does not fit the model."""
    return ProtocolError(422, message, type, loc)


# --------------------------------------------------------------------------- requests


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Model):
    """One input tensor: a row-major ``data`` list (flat or nested) of ``shape`` and ``datatype``."""

    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestOutput(_Model):
    """An output the client asks for (all outputs when the request names none)."""

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Model):
    """``POST /v2/models/{name}/infer`` in the Open Inference Protocol.

    Tensor form: one input of shape ``[rows, features]`` holding encoded features (any name, e.g.
    ``input``). Named-column form: one input per column, each of shape ``[rows]`` (or ``[rows, 1]``),
    named after the column (raw columns when the model ships a preprocessor; ``BYTES`` for text).
    """

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class RecordsRequest(_Model):
    """Named-column rows as JSON objects: ``{"instances": [{"age": 37, "city": "Oslo"}, ...]}``."""

    id: str | None = None
    instances: list[dict[str, Any]] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


# --------------------------------------------------------------------------- responses


class ResponseOutput(_Model):
    """One output tensor, row-major flattened."""

    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferenceResponse(_Model):
    """The answer to an inference request; ``model_version`` names the version that answered."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Model):
    """Name, datatype and shape of an input or output (-1: any size)."""

    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadataResponse(_Model):
    """``GET /v2/models/{name}``; ``parameters`` carries fabric's extras (task, columns, traffic)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class ServerMetadataResponse(_Model):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class LiveResponse(_Model):
    """``GET /v2/health/live``."""

    live: bool


class ReadyResponse(_Model):
    """``GET /v2/health/ready``."""

    ready: bool


class ModelReadyResponse(_Model):
    """``GET /v2/models/{name}[/versions/{version}]/ready``."""

    name: str
    version: str | None = None
    ready: bool


# --------------------------------------------------------------------------- decoding


def _loc(err: dict[str, Any], root: str = "") -> str:
    parts: list[str] = [root] if root else []
    for p in err.get("loc", ()):
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts)


def parse_body(body: bytes) -> InferenceRequest | RecordsRequest:
    """Parse and validate a request body (the OIP tensor form, or ``instances`` records).

    Raises:
        ProtocolError: 400 when the body is not JSON; 422 when it is JSON of the wrong shape.
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid(f"request body must be a JSON object, got {type(obj).__name__}", "invalid_request")
    if "inputs" in obj:
        model: type[BaseModel] = InferenceRequest
    elif "instances" in obj:
        model = RecordsRequest
    else:
        raise invalid(
            "request body needs 'inputs' (Open Inference Protocol tensors) or 'instances' (named-column rows)",
            "invalid_request",
        )
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = _loc(first)
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise invalid(f"{where}: {first['msg']}{more}", "invalid_request", where) from None


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested lists (OIP allows flat or nested ``data``)."""
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def decode_tensor(inp: RequestInput, where: str) -> np.ndarray:
    """The numpy array an input describes, checked against its own shape and datatype.

    Numeric datatypes decode to float64 (NaN where the JSON held null or NaN, for the caller to judge);
    ``BYTES`` decode to an object array of str.

    Raises:
        ProtocolError: 422 naming ``where`` when data and shape or datatype disagree.
    """
    if any(d < 0 for d in inp.shape):
        raise invalid(f"{where}.shape {inp.shape} has a negative dimension", "invalid_shape", f"{where}.shape")
    flat = _flatten(inp.data)
    expected = math.prod(inp.shape)
    if len(flat) != expected:
        raise invalid(
            f"{where} has {len(flat)} value(s) but shape {inp.shape} needs {expected}", "invalid_shape", f"{where}.data"
        )
    if inp.datatype == "BYTES":
        return np.array([v if v is None else str(v) for v in flat], dtype=object).reshape(inp.shape)
    raw = np.asarray(flat) if flat else np.zeros(0)
    if raw.dtype.kind in "fiub":  # the common case: numbers only, converted in C
        arr = raw.astype(np.float64, copy=False)
    else:  # strings, nulls or a mix: judge value by value (numpy would parse "1.5" as a number)
        bad = next((v for v in flat if v is not None and (isinstance(v, str) or not isinstance(v, (int, float)))), None)
        if bad is not None:
            raise invalid(
                f"{where} is {inp.datatype} but holds a non-number ({bad!r})", "invalid_datatype", f"{where}.data"
            )
        arr = np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
    kind = np.dtype(DATATYPES[inp.datatype]).kind
    finite = arr[np.isfinite(arr)]
    if kind in "iu" and not np.all(finite == np.round(finite)):
        raise invalid(f"{where} is {inp.datatype} but holds non-integers", "invalid_datatype", f"{where}.data")
    if kind == "u" and np.any(finite < 0):
        raise invalid(f"{where} is {inp.datatype} but holds negative values", "invalid_datatype", f"{where}.data")
    if kind == "b" and not np.all(np.isin(finite, (0.0, 1.0))):
        raise invalid(f"{where} is BOOL but holds values other than true/false", "invalid_datatype", f"{where}.data")
    return arr.reshape(inp.shape)


def output(name: str, values: np.ndarray, datatype: str) -> dict[str, Any]:
    """One response output (row-major flat ``data``)."""
    return {"name": name, "shape": list(values.shape), "datatype": datatype, "data": values.ravel().tolist()}
