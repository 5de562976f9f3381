"""Input signatures: an own module whose input is not the flat feature vector says what it takes.

fabric's data path, ONNX graph, serving app, batch scoring and registry pyfunc all carry one float32 matrix,
``features`` (numeric columns scaled, categorical ones one-hot, in the ingestion stage's order). A module that
wants something else (category ids for embeddings, a group of columns shaped as a sequence for a 1-D CNN)
declares ``input_signature``, an ordered mapping from its ``forward`` argument names to what each one holds::

    input_signature = {
        "ids": {"columns": ["occupation", "occupation_husb"], "as": "ids"},  # int64 [rows, 2]
        "numeric": {"columns": ["age", "yrs_married"]},                      # float32 [rows, 2]
        "series": {"columns": "x_*", "shape": [1, -1]},                      # float32 [rows, 1, n]
    }

- ``columns``: input column names, or one glob pattern (``x_*``) matched against them in their order.
- ``as``: ``values`` (default): the columns' features as float32 (numeric scaled, categorical one-hot);
  ``ids``: one int64 per categorical column, ``i + 1`` for its ``i``-th training category and ``0`` for a
  null or a category training never saw (so an ``nn.Embedding(len(categories) + 1, dim)`` takes it).
- ``shape``: the per-row shape of a ``values`` input (one ``-1`` allowed), e.g. ``[1, -1]`` for ``Conv1d``.

fabric wraps such a module in :class:`SignatureAdapter`, which cuts the inputs out of ``features`` inside the
graph. Training, the ONNX export (its parity check included), serving and scoring then need no change: the
exported graph takes ``features`` and holds the module's own inputs.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fabric.errors import ConfigError, ConfigProblem

Layout = dict[str, list[str] | None]
"""The input columns in feature order: a categorical column's training categories, None for a numeric one."""

_KEYS = {"columns", "as", "shape"}


def column_layout(feature_names: list[str], categorical: list[str]) -> Layout:
    """The input columns behind ``feature_names`` (the preprocessor's order): ``name -> categories`` for the
    ``categorical`` columns (their one-hot features are ``name=category``), ``name -> None`` for numeric ones."""
    layout: Layout = {}
    cats = set(categorical)
    for feature in feature_names:
        if feature in cats:  # a categorical column with no category seen in training has no feature; skip
            continue
        name, sep, category = feature.partition("=")
        if sep and name in cats and feature not in layout:
            layout.setdefault(name, [])
            layout[name].append(category)  # type: ignore[union-attr]
        else:
            layout[feature] = None
    return layout


def _problem(message: str, field: str) -> ConfigError:
    return ConfigError([ConfigProblem(field, message)])


def _columns(entry: Mapping[str, Any], arg: str, layout: Layout, field: str) -> list[str]:
    wanted = entry.get("columns")
    if isinstance(wanted, str):
        found = [c for c in layout if fnmatch.fnmatchcase(c, wanted)]
        if not found:
            raise _problem(f"input_signature[{arg!r}]: pattern {wanted!r} matches no input column", field)
        return found
    if not isinstance(wanted, (list, tuple)) or not wanted or not all(isinstance(c, str) for c in wanted):
        raise _problem(
            f"input_signature[{arg!r}]['columns'] must be a non-empty list of column names or a glob pattern, "
            f"got {wanted!r}",
            field,
        )
    unknown = [c for c in wanted if c not in layout]
    if unknown:
        raise _problem(
            f"input_signature[{arg!r}] names column(s) {', '.join(map(repr, unknown))} the data does not have; "
            f"input columns: {', '.join(layout)}",
            field,
        )
    return list(wanted)


def _shape(entry: Mapping[str, Any], arg: str, width: int, field: str) -> list[int] | None:
    shape = entry.get("shape")
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(d, int) for d in shape):
        raise _problem(f"input_signature[{arg!r}]['shape'] must be a list of integers, got {shape!r}", field)
    free = [i for i, d in enumerate(shape) if d == -1]
    known = math.prod(d for d in shape if d != -1)
    if len(free) > 1 or any(d == 0 or d < -1 for d in shape):
        raise _problem(f"input_signature[{arg!r}]['shape'] {list(shape)}: positive sizes and at most one -1", field)
    out = list(shape)
    if free:
        if width % known:
            raise _problem(f"input_signature[{arg!r}]: {width} features do not fit shape {list(shape)}", field)
        out[free[0]] = width // known
    if math.prod(out) != width:
        needs = math.prod(out)
        raise _problem(f"input_signature[{arg!r}]: shape {list(shape)} needs {needs} features, not {width}", field)
    return out


class SignatureAdapter(nn.Module):
    """Cuts a module's declared inputs out of the flat ``features`` matrix and calls it with them by name.

    The module is held as ``net`` (its weights are ``net.*`` in a state dict); the index tables are buffers
    that are not saved, rebuilt from the signature and the column layout.
    """

    def __init__(
        self,
        net: nn.Module,
        signature: Mapping[str, Any],
        layout: Layout,
        feature_names: list[str],
        field: str = "train.model",
    ) -> None:
        super().__init__()
        self.net = net
        self.args: list[str] = []
        self.kinds: list[str] = []
        self.shapes: list[list[int] | None] = []
        position = {f: i for i, f in enumerate(feature_names)}
        for i, (arg, entry) in enumerate(signature.items()):
            kind, index, table, shape = _plan(str(arg), entry, layout, position, field)
            self.register_buffer(f"index_{i}", torch.tensor(index, dtype=torch.int64), persistent=False)
            self.register_buffer(f"table_{i}", table, persistent=False)
            self.args.append(str(arg))
            self.kinds.append(kind)
            self.shapes.append(shape)

    def inputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's named inputs for a ``[rows, features]`` float32 batch."""
        out: dict[str, torch.Tensor] = {}
        for i, arg in enumerate(self.args):
            part = features.index_select(1, getattr(self, f"index_{i}"))
            if self.kinds[i] == "ids":
                # A one-hot block times (1, 2, ..., k): the category's number, 0 where the block is all zeros.
                part = torch.round(part @ getattr(self, f"table_{i}")).to(torch.int64)
            elif self.shapes[i] is not None:
                part = part.reshape(-1, *self.shapes[i])  # type: ignore[misc]
            out[arg] = part
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(**self.inputs(features))


def _plan(
    arg: str, entry: Any, layout: Layout, position: dict[str, int], field: str
) -> tuple[str, list[int], torch.Tensor, list[int] | None]:
    if not isinstance(entry, Mapping):
        raise _problem(f"input_signature[{arg!r}] must be a mapping with 'columns', got {entry!r}", field)
    extra = sorted(set(entry) - _KEYS)
    if extra:
        known = ", ".join(sorted(_KEYS))
        raise _problem(f"input_signature[{arg!r}]: unknown key(s) {', '.join(extra)}; known: {known}", field)
    kind = entry.get("as", "values")
    if kind not in ("values", "ids"):
        raise _problem(f"input_signature[{arg!r}]['as'] must be 'values' or 'ids', got {kind!r}", field)
    columns = _columns(entry, arg, layout, field)
    if kind == "values":
        names = [c if layout[c] is None else f"{c}={k}" for c in columns for k in (layout[c] or [None])]
        return kind, [position[n] for n in names], torch.zeros(0), _shape(entry, arg, len(names), field)
    numeric = [c for c in columns if layout[c] is None]
    if numeric:
        raise _problem(f"input_signature[{arg!r}] asks ids of numeric column(s) {', '.join(map(repr, numeric))}", field)
    if entry.get("shape") is not None:
        raise _problem(f"input_signature[{arg!r}]: 'shape' applies to values, not ids", field)
    index: list[int] = []
    rows: list[tuple[int, float]] = []  # per selected feature: (its column's slot, its category number)
    for slot, c in enumerate(columns):
        for k, category in enumerate(layout[c] or []):
            index.append(position[f"{c}={category}"])
            rows.append((slot, float(k + 1)))
    table = torch.zeros(len(index), len(columns), dtype=torch.float32)
    for j, (slot, number) in enumerate(rows):
        table[j, slot] = number
    return kind, index, table, None


def signature_of(net: nn.Module) -> Mapping[str, Any] | None:
    """The module's declared ``input_signature``, or None when it takes the flat feature vector."""
    signature = getattr(net, "input_signature", None)
    return signature if signature else None


def adapt(net: nn.Module, feature_names: list[str], categorical: list[str], field: str = "train.model") -> nn.Module:
    """``net`` itself when it declares no input signature, else ``net`` in a :class:`SignatureAdapter`.

    Raises:
        ConfigError: naming ``field``: the signature is malformed, names columns the data lacks, asks ids of a
            numeric column, or does not match ``net.forward``'s parameters.
    """
    signature = signature_of(net)
    if signature is None:
        return net
    if not isinstance(signature, Mapping):
        what = type(signature).__name__
        raise _problem(f"input_signature must be a mapping of forward argument -> entry, got {what}", field)
    try:
        inspect.signature(net.forward).bind(**{str(k): None for k in signature})
    except TypeError as e:
        raise _problem(
            f"input_signature declares {', '.join(map(str, signature))} but {type(net).__name__}.forward does not "
            f"take them as keywords: {e}",
            field,
        ) from None
    return SignatureAdapter(net, signature, column_layout(feature_names, categorical), feature_names, field)
