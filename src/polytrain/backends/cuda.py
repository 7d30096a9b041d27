"""NVIDIA GPUs (and ROCm builds, which present themselves as CUDA): NCCL collectives."""

from __future__ import annotations

import torch

from polytrain.backends.base import AcceleratorBackend, Capabilities
from polytrain.errors import BackendError

# ncclDataType_t (NCCL user guide, "Types"): int8, uint8, int32, uint32, int64, uint64, half, float, double, bfloat16,
# and the fp8 types on recent GPUs (not used by polytrain's collectives).
NCCL_DTYPES = frozenset({torch.int8, torch.uint8, torch.int32, torch.uint32, torch.int64, torch.uint64, torch.float16,
                         torch.float32, torch.float64, torch.bfloat16})


def _torch_at_least(major: int, minor: int) -> bool:
    version = torch.__version__.split("+")[0].split(".")
    return (int(version[0]), int(version[1])) >= (major, minor)


class CUDABackend(AcceleratorBackend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    collective_dtypes = NCCL_DTYPES

    @classmethod
    def create(cls) -> CUDABackend:
        if not cls.is_available():
            raise BackendError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
        return cls()

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def capabilities(self) -> Capabilities:
        major, minor = torch.cuda.get_device_capability()
        return Capabilities(
            bf16=torch.cuda.is_bf16_supported(),
            fp16=True,
            fp8=(major, minor) >= (8, 9),
            # torch._grouped_mm: Hopper and newer; Ampere too from torch 2.9
            grouped_mm=hasattr(torch, "_grouped_mm") and (major >= 9 or (major == 8 and _torch_at_least(2, 9))),
            device_memory_stats=True,
            fused_attention=major >= 8,
        )

    def describe(self) -> str:
        return f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name()}, nccl)"
