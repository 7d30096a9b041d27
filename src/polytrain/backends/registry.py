"""The backend registry: `get_backend`, `detect` and `kernel` (re-exported by `polytrain.backends`), all read from
the one table `polytrain.backends.BACKENDS`."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from polytrain.backends import BACKENDS, DEVICE_CHOICES
from polytrain.backends.base import Backend
from polytrain.errors import BackendError, closest


@functools.cache
def backend_classes() -> tuple[type[Backend], ...]:
    """Every registered backend class, in `--device auto`'s order."""
    classes = []
    for spec in BACKENDS.values():
        module, name = spec.split(":")
        classes.append(getattr(importlib.import_module(f"polytrain.backends.{module}"), name))
    return tuple(classes)


def collective_dtypes(library: str) -> frozenset[torch.dtype]:
    """The element types collective library `library` ("gloo", "nccl", "hccl") reduces."""
    tables = {cls.dist_backend: cls.collective_dtypes for cls in backend_classes() if cls.dist_backend}
    if library not in tables:
        raise ValueError(f"unknown collective library {library!r}: one of {', '.join(sorted(tables))}")
    return tables[library]


@functools.cache
def kernel(name: str, device_type: str) -> Callable[..., torch.Tensor] | None:
    """The device kernel `name` for tensors on `device_type` (see Backend.kernels), or None: the caller then uses
    its portable reference. How models reach device kernels without naming a device."""
    for cls in backend_classes():
        if cls.handles(device_type):
            return cls.create().kernels().get(name) if cls.is_available() else None
    return None


def detect() -> Backend:
    """The best backend on this machine: the first available one in `BACKENDS` (NPU, CUDA, another registered
    accelerator, then the CPU)."""
    return next(cls for cls in backend_classes() if cls.is_available()).create()


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; raises BackendError (one line, with the fix) when it cannot run here."""
    if name == "auto":
        return detect()
    if name in BACKENDS:
        return backend_classes()[list(BACKENDS).index(name)].create()
    hint = closest(name, DEVICE_CHOICES)
    raise BackendError(f"unknown device `{name}`{hint}; choose one of {', '.join(DEVICE_CHOICES)}")
