"""The model families polytrain knows: `model.architecture` -> ModelSpec, and the presets of all of them.

A new family registers its spec here (`register`), or from outside with the same call before the job is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from polytrain.errors import ConfigError, closest
from polytrain.models.common.config import ModelConfig
from polytrain.models.common.decoder import DecoderLM
from polytrain.models.common.spec import ModelSpec
from polytrain.schema import from_dict

_FAMILIES: dict[str, ModelSpec] = {}
PRESETS: dict[str, dict[str, Any]] = {}
"""Every registered family's presets by name (filled by `register`)."""
DEFAULT_PRESET = "tiny"


def register(spec: ModelSpec) -> None:
    clash = sorted(set(spec.presets) & set(PRESETS) - set(_FAMILIES.get(spec.architecture, spec).presets))
    if clash:
        raise ValueError(f"presets {clash} of {spec.architecture} are taken by another family")
    _FAMILIES[spec.architecture] = spec
    for name, values in spec.presets.items():
        PRESETS[name] = {**values, "architecture": spec.architecture}


def families() -> list[str]:
    return list(_FAMILIES)


def spec_for_architecture(architecture: str) -> ModelSpec:
    if architecture not in _FAMILIES:
        raise ConfigError(f"unknown model architecture `{architecture}`{closest(architecture, _FAMILIES)}; "
                          f"registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[architecture]


def spec_for(config: ModelConfig) -> ModelSpec:
    """The spec of the family `config` belongs to."""
    return spec_for_architecture(config.architecture)


def build_model(config: ModelConfig, device: torch.device | str = "meta", seed: int | None = 0) -> DecoderLM:
    """The model of `config`, allocated on `device` and initialised from `seed` (meta: left uninitialised)."""
    if torch.device(device).type == "meta":  # a skeleton: never fake tensors, which laying out cannot swap
        with unset_fake_temporarily():
            return spec_for(config).build(config, device, seed)
    return spec_for(config).build(config, device, seed)


def model_config_from_table(table: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """A ModelConfig from a `[model]` table: `preset` gives the starting values, other keys override them.
    `custom` and `hf:<model_type>` / `run:<dir>` (written into resolved configs of runs started from a checkpoint or
    a run) start from the family's field defaults; the family is the preset's, else `architecture`."""
    table = dict(table)
    preset = table.get("preset", DEFAULT_PRESET)
    if preset not in PRESETS and preset != "custom" and not str(preset).startswith(("hf:", "run:")):
        raise ConfigError(f"unknown model preset `{preset}`{closest(str(preset), PRESETS)}; presets: "
                          f"{', '.join(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **table}
    if preset in PRESETS and table.get("architecture", PRESETS[preset]["architecture"]) != PRESETS[preset][
            "architecture"]:
        raise ConfigError(f"`{prefix}.architecture` = {table['architecture']!r} contradicts preset `{preset}` (a "
                          f"{PRESETS[preset]['architecture']} model): drop one of them")
    architecture = values.get("architecture") or next(iter(_FAMILIES))
    if not isinstance(architecture, str) or architecture not in _FAMILIES:
        raise ConfigError(f"`{prefix}.architecture` = {architecture!r} is not a registered model family"
                          f"{closest(str(architecture), _FAMILIES)}; registered: {', '.join(_FAMILIES)}")
    values["architecture"] = architecture
    return from_dict(_FAMILIES[architecture].config_class, values, prefix)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with field overrides (for tests and scripts)."""
    return model_config_from_table({"preset": name, **overrides})


def _register_builtin() -> None:
    from polytrain.models import deepseek_v3, deepseek_v4

    register(deepseek_v3.SPEC)
    register(deepseek_v4.SPEC)


_register_builtin()
