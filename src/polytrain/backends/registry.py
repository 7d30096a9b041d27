"""The backend registry: `get_backend`, `detect` and `kernel` (re-exported by `polytrain.backends`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from polytrain.backends import DEVICE_CHOICES
from polytrain.backends.base import Backend
from polytrain.backends.cpu import CPUBackend
from polytrain.backends.cuda import CUDABackend
from polytrain.backends.npu import NPUBackend, import_torch_npu
from polytrain.backends.privateuse1 import PrivateUse1Backend
from polytrain.errors import BackendError, closest

BY_DEVICE_TYPE = {cls.device_type: cls for cls in (CPUBackend, CUDABackend, NPUBackend)}


def collective_dtypes(library: str) -> frozenset[torch.dtype]:
    """The element types collective library `library` ("gloo", "nccl", "hccl") reduces."""
    tables = {cls.dist_backend: cls.collective_dtypes for cls in (CPUBackend, CUDABackend, NPUBackend)}
    if library not in tables:
        raise ValueError(f"unknown collective library {library!r}: one of {', '.join(sorted(tables))}")
    return tables[library]


@functools.cache
def kernel(name: str, device_type: str) -> Callable[..., torch.Tensor] | None:
    """The device kernel `name` for tensors on `device_type` (see Backend.kernels), or None: the caller then uses
    its portable reference. How models reach device kernels without naming a device."""
    backend = BY_DEVICE_TYPE.get(device_type)
    if backend is None or not backend.is_available():
        return None
    return backend().kernels().get(name)


def detect() -> Backend:
    """The best backend on this machine: NPU, then CUDA, then another registered accelerator, then CPU."""
    if NPUBackend.is_available():
        return NPUBackend()
    if CUDABackend.is_available():
        return CUDABackend()
    if PrivateUse1Backend.is_available():
        return PrivateUse1Backend()
    return CPUBackend()


def get_backend(name: str = "auto") -> Backend:
    """The backend called `name`; raises BackendError (one line, with the fix) when it cannot run here."""
    if name == "auto":
        return detect()
    if name == "cpu":
        return CPUBackend()
    if name == "cuda":
        if not CUDABackend.is_available():
            raise BackendError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
        return CUDABackend()
    if name == "npu":
        import_torch_npu()
        if not NPUBackend.is_available():
            raise BackendError(
                "--device npu: torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
            )
        return NPUBackend()
    if name == "privateuse1":
        return PrivateUse1Backend()
    hint = closest(name, DEVICE_CHOICES)
    raise BackendError(f"unknown device `{name}`{hint}; choose one of {', '.join(DEVICE_CHOICES)}")
