"""The CPU backend: gloo collectives, host memory figures, bf16 autocast where the CPU has bf16 instructions."""

from __future__ import annotations

import ctypes
import os

import torch

from polytrain.backends.base import Backend, Capabilities

# What gloo reduces on host tensors (ProcessGroupGloo's type dispatch).
GLOO_DTYPES = frozenset({torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32,
                         torch.float64, torch.bfloat16, torch.bool})


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process for the next allocation. True if it took.

    By default glibc hands every block over 32 MiB (and the heap's free top) back to the kernel when it is freed, so
    a training step that allocates its logits chunks, gradients and activations afresh page-faults all of them in
    again, step after step: on a VM whose freed pages go back to the host, faulting in a 256 MiB gradient took longer
    than the GEMM that fills it. A training process reaches a steady footprint after its first steps, so keeping
    that memory costs little: its RSS stays at the step's high-water mark between steps. Set
    POLYTRAIN_RELEASE_HOST_MEMORY=1 to keep glibc's default. Not glibc (macOS, musl): nothing to do, False.
    """
    if os.environ.get("POLYTRAIN_RELEASE_HOST_MEMORY", "") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, libc among them
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    collective_dtypes = GLOO_DTYPES

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """None: on the small models a CPU trains, autocast casts cost more than bf16 matmuls save (`polytrain bench
        examples/sft_tiny.toml --set run.precision=...` compares them). `precision = "bf16"` still turns it on where
        the CPU has bf16 instructions (`capabilities.bf16`)."""
        return None

    def prepare_training(self) -> None:
        keep_freed_host_memory()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            bf16=_cpu_has_bf16(),
            fp16=False,  # fp16 matmul on CPU runs ~400x slower than bf16: treat as unsupported
            fp8=False,
            grouped_mm=hasattr(torch, "_grouped_mm"),
            device_memory_stats=False,
            fused_attention=False,
        )
