"""The table of training objectives. One entry per verb drives everything that knows the list of algorithms: the CLI
verbs and their help, `run.algorithm`, the job config's `[<name>]` sections, `--help-config`, `polytrain bench`.

Classes are named by import path and imported only when their verb runs, so listing the verbs (`polytrain --help`)
loads no model code. Adding an algorithm = one file with its Objective (and its config section class, if any) plus
one `register(...)` call: here for the built-in ones, or anywhere before the CLI or the config loader runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from polytrain.errors import ConfigError, closest


@dataclass(frozen=True)
class Flag:
    """An extra command-line flag of one verb: instead of training, call the objective's `method` with the flag's
    value and print the dict it returns as JSON."""

    name: str
    metavar: str
    help: str
    method: str


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    """The verb (`polytrain NAME`), the value of `run.algorithm`, and the name of the config section."""
    summary: str
    """One line for `polytrain --help`."""
    description: str
    """What `polytrain NAME --help` says first."""
    objective: str | type
    """The Objective class, or 'module:Class' (imported when the verb runs)."""
    section: str | type | None = None
    """The dataclass of the `[NAME]` config section (or 'module:Class'); None: the objective has none."""
    section_defaults: str | Any = None
    """Optional 'module:function' (or function) mapping the section's TOML table to the values to validate, e.g.
    to expand presets."""
    epilog: str = ""
    """Examples and data format, after the options in `polytrain NAME --help`."""
    flags: tuple[Flag, ...] = ()


_ENTRIES: dict[str, ObjectiveEntry] = {}


def register(entry: ObjectiveEntry) -> None:
    """Add (or replace) an objective."""
    _ENTRIES[entry.name] = entry


def names() -> list[str]:
    return list(_ENTRIES)


def entries() -> list[ObjectiveEntry]:
    return list(_ENTRIES.values())


def entry(name: str) -> ObjectiveEntry:
    if name not in _ENTRIES:
        raise ConfigError(f"unknown algorithm `{name}`{closest(name, _ENTRIES)}; available: {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


def resolve(ref: str | Any) -> Any:
    """The object a 'module:attribute' string names (anything else is returned as is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def objective_class(name: str) -> type:
    return resolve(entry(name).objective)


def section_class(name: str) -> type | None:
    return resolve(entry(name).section)


def section_from_table(name: str, table: dict[str, Any]) -> Any:
    """The validated `[name]` section of a job config."""
    from polytrain.schema import from_dict

    cls = section_class(name)
    if cls is None:
        raise ConfigError(f"`{name}` takes no config section")
    defaults = entry(name).section_defaults
    values = resolve(defaults)(table) if defaults is not None else table
    return from_dict(cls, values, name)
