"""The user's own code by import path (``package.module:function``): resolved once, with one clear error.

A config names a model builder (``train.model``) or a training loop (``train.loop``) the way Ray Serve names
an ``import_path``. The module is imported from the job's working directory (the current directory, put on
``sys.path``) or an installed package. A builder's module is also copied into the model folder (``code/``) so
that a process elsewhere (a serving replica, ``mlflow.pyfunc.load_model`` in another directory) rebuilds the
module from the folder alone.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fabric.errors import ConfigError, ConfigProblem

CODE_DIR = "code"
"""Folder of a model folder holding the builder's module (or package), put on ``sys.path`` when loading."""
MAX_CODE_BYTES = 5 * 2**20
"""A module bigger than this is not copied into the model folder (it must then be installed where it loads)."""


def is_import_path(name: str) -> bool:
    """Whether a builder name is an import path (``module:function``) rather than a registered builder."""
    return ":" in name


def add_to_path(*folders: str | Path) -> None:
    """Put existing ``folders`` at the front of ``sys.path`` (once each)."""
    for folder in folders:
        text = str(folder)
        if text and os.path.isdir(text) and text not in sys.path:
            sys.path.insert(0, text)


def _problem(field: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(field, message)])


def resolve(path: str, field: str = "train.model") -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable.

    The current directory (the job's working dir) is searched first, then installed packages.

    Raises:
        ConfigError: naming ``field``: malformed path, module not found, an error while importing it, no such
            attribute, or not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise _problem(field, f"{path!r} must look like 'package.module:function'")
    add_to_path(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.split(".")[: len(e.name.split("."))] == e.name.split("."):
            raise _problem(
                field,
                f"module {module_name!r} of {path!r} not found in the working dir {os.getcwd()} or the installed "
                f"packages (run from the folder holding it, or pass it as the job's --working-dir)",
            ) from None
        raise _problem(field, f"importing {module_name!r} of {path!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # the user's module raised while importing
        raise _problem(field, f"importing {module_name!r} of {path!r} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise _problem(field, f"module {module_name!r} ({module.__file__}) has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise _problem(field, f"{path!r} is a {type(fn).__name__}, not a function")
    return fn


def _accepts(fn: Callable[..., Any], path: str, field: str, *args: Any, **kwargs: Any) -> None:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise _problem(field, f"{path!r} cannot be called with {_call_text(args, kwargs)}: {e}") from None
    except ValueError:  # no signature to inspect (a builtin): let the call tell
        pass


def _call_text(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = ["config" for _ in args] + [f"{k}=…" for k in kwargs]
    return f"({', '.join(parts)})"


def build_user_model(
    path: str,
    kwargs: dict[str, Any],
    field: str = "train.model",
    columns: dict[str, list[str] | None] | None = None,
) -> nn.Module:
    """Call the builder at ``path`` with ``kwargs`` (``input_dim``, ``output_dim`` and the model_args), plus
    ``columns`` (input column -> its training categories, None for a numeric one, in feature order) when the
    builder has a parameter of that name: for embedding sizes and input signatures. ``columns`` is derived from
    the data at every build, never stored with the kwargs.

    Raises:
        ConfigError: as :func:`resolve`, or the builder does not take these arguments, raises, or does not
            return a ``torch.nn.Module``.
    """
    fn = resolve(path, field)
    if columns is not None:
        try:
            if "columns" in inspect.signature(fn).parameters:
                kwargs = {**kwargs, "columns": columns}
        except ValueError:  # no signature to inspect
            pass
    _accepts(fn, path, field, **kwargs)
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise _problem(field, f"{path!r}{_call_text((), kwargs)} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise _problem(field, f"{path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model(
    path: str, model_args: dict[str, Any], feature_names: list[str], categorical: list[str], output_dim: int
) -> nn.Module:
    """Build the user's module once (in its input-signature adapter when it declares one) and run two rows of
    zeros through it: what a run would do first, so that a wrong builder fails before any work starts.

    Raises:
        ConfigError: as :func:`build_user_model`, the input signature does not fit the data or the module
            (:func:`fabric.models._signature.adapt`), or the forward pass fails or does not give
            ``[rows, output_dim]``.
    """
    import torch

    from fabric.models._signature import adapt, column_layout

    input_dim = len(feature_names)
    kwargs = {"input_dim": input_dim, "output_dim": output_dim, **model_args}
    net = build_user_model(path, kwargs, columns=column_layout(feature_names, categorical))
    model = adapt(net, feature_names, categorical)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, input_dim))
    except Exception as e:
        what = f"fails on a [2, {input_dim}] float batch: {type(e).__name__}: {e}"
        raise _problem("train.model", f"the module {path!r} builds {what}") from e
    shape = tuple(getattr(out, "shape", ()))
    if shape != (2, output_dim):
        raise _problem(
            "train.model",
            f"the module {path!r} builds maps a [2, {input_dim}] batch to {list(shape)}; it must give "
            f"[rows, output_dim] = [2, {output_dim}] (class logits, or one value for regression)",
        )
    return model


def check_loop(path: str) -> Callable[[dict[str, Any]], None]:
    """Resolve the user's ``train_loop_per_worker`` and check it takes one argument (the config dict).

    Raises:
        ConfigError: as :func:`resolve` (field ``train.loop``), or it does not take one positional argument.
    """
    fn = resolve(path, "train.loop")
    _accepts(fn, path, "train.loop", {})
    return fn


def code_root(path: str) -> Path | None:
    """The folder on ``sys.path`` the module of ``path`` was imported from, when it is the user's own code
    (not an installed package, not the standard library); None otherwise. The module must be importable."""
    add_to_path(os.getcwd())
    top = importlib.import_module(path.partition(":")[0].split(".")[0])
    file = getattr(top, "__file__", None)
    if not file:
        return None
    where = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in where.parts):
        return None
    stdlib = Path(inspect.getfile(os)).resolve().parent
    if where.is_relative_to(stdlib):
        return None
    # a package: .../root/top/__init__.py; a module: .../root/top.py
    return where.parent.parent if where.name == "__init__.py" else where.parent


def _sources(path: str) -> list[Path]:
    """The files of the user's top-level module or package of ``path`` (no caches)."""
    root = code_root(path)
    if root is None:
        return []
    top = path.partition(":")[0].split(".")[0]
    if (root / top).is_dir():
        return sorted(p for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    return [root / f"{top}.py"]


def code_digest(path: str) -> str:
    """A digest of the user's module source (empty for installed code): edits to it start a new run."""
    root = code_root(path)
    h = hashlib.sha256()
    for file in _sources(path):
        h.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())  # type: ignore[arg-type]
    return h.hexdigest()[:16] if root is not None else ""


def bundle_code(path: str, folder: Path) -> Path | None:
    """Copy the user's module (or top-level package) of ``path`` into ``folder/code``; None when it is
    installed code or too big (it must then be importable wherever the model loads)."""
    root = code_root(path)
    files = _sources(path)
    if root is None or not files or sum(f.stat().st_size for f in files) > MAX_CODE_BYTES:
        return None
    out = folder / CODE_DIR
    if out.exists():
        shutil.rmtree(out)
    for file in files:
        target = out / file.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    return out
