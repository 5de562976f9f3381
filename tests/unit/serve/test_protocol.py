"""The wire format: body parsing and tensor decoding, each problem a ProtocolError with its status."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fabric.serve.protocol import (
    InferenceRequest,
    ProtocolError,
    RecordsRequest,
    RequestInput,
    decode_tensor,
    parse_body,
)


def _inp(shape: list[int], data: list, datatype: str = "FP32") -> RequestInput:
    return RequestInput(name="input", shape=shape, datatype=datatype, data=data)


def test_parses_tensor_and_records_bodies() -> None:
    req = parse_body(
        b'{"id": "r1", "inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
    )
    assert isinstance(req, InferenceRequest) and req.id == "r1" and req.inputs[0].shape == [1, 2]
    rec = parse_body(json.dumps({"instances": [{"age": 3}]}).encode())
    assert isinstance(rec, RecordsRequest) and rec.instances == [{"age": 3}]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[1, 2]", 422, "invalid_request"),
        (b'{"rows": []}', 422, "invalid_request"),
        (b'{"inputs": []}', 422, "invalid_request"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}', 422, "invalid_request"),
        (b'{"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]}', 422, "invalid_request"),
    ],
)
def test_bad_bodies_get_their_status(body: bytes, status: int, kind: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_body(body)
    assert (info.value.status, info.value.type) == (status, kind)
    err = json.loads(info.value.body())
    assert set(err) == {"error", "type", "loc"} and err["error"]


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_body(
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, {"name": "y", "shape": [1], "datatype": "FP99", "data": [1]}]}'
        )
    assert info.value.loc == "inputs[1].datatype"
    assert "inputs[1].datatype" in info.value.message


def test_decodes_flat_and_nested_row_major() -> None:
    flat = decode_tensor(_inp([2, 3], [1, 2, 3, 4, 5, 6]), "inputs[0]")
    nested = decode_tensor(_inp([2, 3], [[1, 2, 3], [4, 5, 6]]), "inputs[0]")
    assert flat.shape == (2, 3) and np.array_equal(flat, nested)
    assert flat[1].tolist() == [4, 5, 6]


def test_null_decodes_to_nan_for_the_caller_to_judge() -> None:
    x = decode_tensor(_inp([1, 2], [None, 1.5]), "inputs[0]")
    assert np.isnan(x[0, 0]) and x[0, 1] == 1.5


@pytest.mark.parametrize(
    ("inp", "kind", "fragment"),
    [
        (_inp([2, 2], [1, 2, 3]), "invalid_shape", "needs 4"),
        (_inp([1, 2], [1, "2"]), "invalid_datatype", "non-number ('2')"),
        (_inp([1, 2], [1, {"a": 1}]), "invalid_datatype", "non-number"),
        (_inp([2], [1.5, 2], "INT64"), "invalid_datatype", "non-integers"),
        (_inp([2], [-1, 2], "UINT8"), "invalid_datatype", "negative"),
        (_inp([2], [2, 1], "BOOL"), "invalid_datatype", "true/false"),
        (_inp([-1, 2], [1, 2]), "invalid_shape", "negative"),
    ],
)
def test_decoding_problems_are_422_naming_the_input(inp: RequestInput, kind: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_tensor(inp, "inputs[3]")
    assert info.value.status == 422 and info.value.type == kind
    assert fragment in info.value.message and "inputs[3]" in info.value.message


def test_bytes_decode_to_strings() -> None:
    x = decode_tensor(_inp([2], ["oslo", None], "BYTES"), "inputs[0]")
    assert x.dtype == object and x.tolist() == ["oslo", None]


def test_integers_and_bools_decode_as_numbers() -> None:
    assert decode_tensor(_inp([3], [1, 0, 1], "BOOL"), "i").tolist() == [1.0, 0.0, 1.0]
    assert decode_tensor(_inp([2], [3, 4], "INT32"), "i").tolist() == [3.0, 4.0]
