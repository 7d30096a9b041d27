"""Typed config trees: dataclasses <-> plain dicts (TOML / JSON), with validation that names the field.

A config class is a dataclass whose fields are declared with `option(...)`: a default, a help text, and optional
bounds or choices. `from_dict` builds an instance from a nested dict and raises `ConfigError` naming the dotted key
for an unknown key (with the closest valid one), a wrong type, or a value out of range. `to_dict` is the inverse.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from polytrain.errors import ConfigError, closest

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[Any] | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A documented config field. Bounds apply to numbers (and to each item of a list of numbers)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices else None}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where a float is expected)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"`{key}` must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = closest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"`{key}` must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        item_type = typing.get_args(tp)[0]
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` must be a table of settings, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for `{key}`")


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_bounds(item, meta, f"{key}[{i}]")
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        hint = closest(str(value), [str(c) for c in choices])
        raise ConfigError(f"`{key}` must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"`{key}` must be >= {meta['ge']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"`{key}` must be > {meta['gt']}, got {value!r}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"`{key}` must be <= {meta['le']}, got {value!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (resolving them is most of a config load's time)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass `cls` from `data`, validating every key. Missing keys take their defaults."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            section = f" in [{prefix}]" if prefix else ""
            raise ConfigError(f"unknown config key `{where}`{section}{closest(key, fields)}")
    values = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(data[name], hints[name], key)
            _check_bounds(value, field.metadata, key)
            values[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key `{key}`: {field.metadata.get('help', '')}")
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    """The inverse of `from_dict`: nested plain dicts, with None values left out (TOML has no null)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if field.metadata.get("flatten"):  # a dict of sections, written as sections of the parent
            out.update({k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()})
            continue
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field: the source of the config reference docs."""
    rows = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("flatten"):
            continue
        key = f"{prefix}.{field.name}" if prefix else field.name
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        help_text = field.metadata.get("help", "")
        if field.metadata.get("choices"):
            help_text += f" One of: {', '.join(map(str, field.metadata['choices']))}."
        rows.append((key, _type_name(tp), default, help_text))
    return rows


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted == "a.b"`, creating tables on the way."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"`{'.'.join(parts[: i + 1])}` is a value, not a table: cannot set `{dotted}`")
        node = child
    node[parts[-1]] = value
