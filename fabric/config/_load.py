"""Load a YAML config, apply dotted overrides, validate every field at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fabric.config.pipeline import PipelineConfig
from fabric.errors import ConfigError, ConfigProblem

M = TypeVar("M", bound=BaseModel)


class Replacement(dict):  # type: ignore[type-arg]
    """A mapping an override sets as a whole: :func:`deep_merge` puts it in place of the value it names
    instead of merging into it (so ``llm.serve.adapters={}`` empties the mapping)."""


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Turn ``["train.num_workers=4", ...]`` into a nested dict; values are parsed as YAML.

    Each override replaces the value it names: a mapping value (``key={}``, ``key={a: 1}``) comes back as a
    :class:`Replacement`, which :func:`deep_merge` sets instead of merging.
    """
    nested: dict[str, Any] = {}
    problems: list[ConfigProblem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(ConfigProblem(item, "override must look like section.field=value"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(ConfigProblem(key, f"conflicts with the override of {part!r}"))
                break
            node = child
        else:
            node[parts[-1]] = Replacement(value) if isinstance(value, dict) else value
    return nested, problems


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in; nested dicts merge, everything else (a
    :class:`Replacement` included) replaces."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Replacement):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the sub-model at ``loc`` (the parent of an unknown key), if one is there."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def problems_from(err: ValidationError, model: type[BaseModel]) -> list[ConfigProblem]:
    """Translate pydantic's errors into one ConfigProblem per field, naming what is allowed."""
    out: list[ConfigProblem] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            out.append(ConfigProblem(path, f"unknown key{hint}"))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("missing", "value_error") and "input" in e:
            msg += f" (got {e['input']!r})"
        out.append(ConfigProblem(path, msg))
    return out


def validate(raw: dict[str, Any], model: type[M] = PipelineConfig, source: str | None = None) -> M:  # type: ignore[assignment]
    """Validate a raw mapping, raising one ConfigError that lists every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", f"top level must be a mapping, got {type(raw).__name__}")], source)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(problems_from(e, model), source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping. Raises ConfigError on I/O or syntax."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([ConfigProblem("", f"config file not found: {p}")], str(p))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([ConfigProblem("", f"invalid YAML{where}: {getattr(e, 'problem', e)}")], str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", f"top level must be a mapping, got {type(raw).__name__}")], str(p))
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[M] = PipelineConfig,  # type: ignore[assignment]
) -> M:
    """Load ``path`` (or the defaults when None), apply ``overrides`` and validate everything.

    Args:
        path: a YAML file; None starts from the model's defaults.
        overrides: dotted ``section.field=value`` strings, applied after the file.
        model: the config model to validate against.

    Raises:
        ConfigError: listing every problem in the file and the overrides together.
    """
    source = str(path) if path is not None else "<defaults>"
    raw = read_yaml(path) if path is not None else {}
    nested, bad = parse_overrides(overrides or [])
    try:
        # Overrides land on the full config (defaults spelled out), so `tune.search_space.lr.low=...`
        # changes one value of a default entry instead of replacing the entry.
        base = validate(raw, model, source).model_dump()
    except ConfigError:
        base = raw
    try:
        cfg = validate(deep_merge(base, nested), model, source)
    except ConfigError as e:
        raise ConfigError(bad + e.problems, source) from None
    if bad:
        raise ConfigError(bad, source)
    return cfg


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
