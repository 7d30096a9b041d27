"""The hardware catalogue: one TOML file per chip under plan/chips/ (every figure with its source), plus the
user's own chip files (`--hardware path/to/chip.toml`, same keys)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from polytrain.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRECISIONS = ("bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Chip:
    """One device as the planner sees it. Bandwidths are per device and per direction."""

    name: str
    description: str
    bf16_tflops: float
    fp16_tflops: float
    fp8_tflops: float
    hbm_gb: float
    hbm_tbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    devices_per_node: int
    host_memory_gb: float
    compute_efficiency: float
    """Fraction of the dense peak the model's matrix products reach (calibrate with `polytrain plan calibrate`)."""
    comm_efficiency: float
    """Fraction of the link bandwidth a collective reaches."""
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def peak_flops(self, precision: str = "bf16") -> float:
        value = getattr(self, f"{precision}_tflops")
        if value <= 0:
            raise ConfigError(f"{self.name} has no {precision} matrix units: use --precision bf16")
        return value * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.hbm_gb * 1e9

    def with_efficiency(self, compute: float | None = None, comm: float | None = None) -> Chip:
        return replace(self, compute_efficiency=compute or self.compute_efficiency,
                       comm_efficiency=comm or self.comm_efficiency)


REQUIRED = tuple(f.name for f in fields(Chip) if f.name != "sources")


def _chip_dir() -> Any:
    return resources.files("polytrain.plan") / "chips"


def known_chips() -> list[str]:
    return sorted(p.name[:-5] for p in _chip_dir().iterdir() if p.name.endswith(".toml"))


def chip_from_table(table: dict[str, Any], origin: str) -> Chip:
    missing = [k for k in REQUIRED if k not in table]
    if missing:
        raise ConfigError(f"{origin}: missing chip key(s) {', '.join(missing)} (see `polytrain plan --list-hardware`"
                          " for a complete file)")
    unknown = sorted(set(table) - set(REQUIRED) - {"sources"})
    if unknown:
        raise ConfigError(f"{origin}: unknown chip key `{unknown[0]}`{closest(unknown[0], REQUIRED)}")
    values = {k: table[k] for k in REQUIRED}
    for key in REQUIRED[2:]:
        if not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or values[key] < 0:
            raise ConfigError(f"{origin}: `{key}` must be a number >= 0, got {values[key]!r}")
    for key in ("hbm_gb", "devices_per_node", "compute_efficiency", "comm_efficiency", "intra_node_gbps",
                "inter_node_gbps"):
        if values[key] <= 0:
            raise ConfigError(f"{origin}: `{key}` must be > 0")
    if values["compute_efficiency"] > 1 or values["comm_efficiency"] > 1:
        raise ConfigError(f"{origin}: efficiencies are fractions of the peak: 0 < efficiency <= 1")
    values["devices_per_node"] = int(values["devices_per_node"])
    return Chip(**values, sources=dict(table.get("sources", {})))


def load_chip(spec: str) -> Chip:
    """A catalogue name (`h800`, `ascend-910c`, ...) or a path to a chip TOML file."""
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"chip file not found: {spec}")
        try:
            return chip_from_table(tomllib.loads(path.read_text(encoding="utf-8")), str(path))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    name = spec.lower()
    if name not in known_chips():
        raise ConfigError(f"unknown hardware `{spec}`{closest(name, known_chips())}; known: "
                          f"{', '.join(known_chips())}, or a chip TOML file")
    text = (_chip_dir() / f"{name}.toml").read_text(encoding="utf-8")
    return chip_from_table(tomllib.loads(text), f"{name}.toml")


# torch's device names (`get_device_name()`) of the catalogue's chips, for the MFU a training run reports. Only names
# that fix the dense peak: H100 PCIe / NVL, 910B3 / 910B4 and the like have other peaks and are left to
# `log.peak_tflops`.
DEVICE_NAMES = (
    (r"^NVIDIA H100 80GB HBM3$|^NVIDIA H100 SXM", "h100"),
    (r"^NVIDIA H800\b", "h800"),
    (r"^NVIDIA H20$", "h20"),
    (r"^NVIDIA A100\b", "a100"),
    (r"^NVIDIA B200\b", "b200"),
    (r"^Ascend910B2$", "ascend-910b"),
    (r"^Ascend910_93", "ascend-910c-die"),  # each 910C die shows as one device
)


def chip_for_device_name(device_name: str | None) -> Chip | None:
    """The catalogue chip whose peak a device of this name has, or None when the name does not pin one down."""
    for pattern, chip in DEVICE_NAMES:
        if device_name and re.search(pattern, device_name):
            return load_chip(chip)
    return None


def chip_to_toml(chip: Chip, note: str = "") -> str:
    import tomli_w

    table = {k: getattr(chip, k) for k in REQUIRED}
    table["sources"] = dict(chip.sources)
    header = f"# {note}\n" if note else ""
    return header + tomli_w.dumps(table)
