"""Device backends: the only package that names a device.

`get_backend("auto" | "cpu" | "cuda" | "npu" | "privateuse1")` returns the `Backend` every other module uses.
Importing this package does not import torch: the command line reads `DEVICE_CHOICES` for every command (`polytrain
audit` and `plan` never need torch), and the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu", "privateuse1")

_LAZY = {"Backend": "base", "Capabilities": "base", "MemoryStats": "base", "collective_dtypes": "registry",
         "detect": "registry", "get_backend": "registry", "kernel": "registry"}
__all__ = ["DEVICE_CHOICES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
