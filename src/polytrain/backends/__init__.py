"""Device backends: the only package that names a device.

`get_backend("auto" | "cpu" | "cuda" | "npu" | "privateuse1")` returns the `Backend` every other module uses.
Importing this package does not import torch: the command line reads `DEVICE_CHOICES` for every command (`polytrain
audit` and `plan` never need torch), and the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS = {"npu": "npu:NPUBackend", "cuda": "cuda:CUDABackend", "privateuse1": "privateuse1:PrivateUse1Backend",
            "cpu": "cpu:CPUBackend"}
"""The one registry of backends: `--device` name -> "module:Class" under polytrain.backends, in the order
`--device auto` tries them (the first available one wins; the CPU always is). Adding a device is one line here and
its module (docs/architecture.md)."""
DEVICE_CHOICES = ("auto", *sorted(BACKENDS))

_LAZY = {"Backend": "base", "Capabilities": "base", "MemoryStats": "base", "backend_classes": "registry",
         "collective_dtypes": "registry", "detect": "registry", "get_backend": "registry", "kernel": "registry"}
__all__ = ["BACKENDS", "DEVICE_CHOICES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
