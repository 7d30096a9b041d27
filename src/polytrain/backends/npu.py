"""Huawei Ascend NPUs through torch_npu: HCCL collectives.

torch_npu registers itself as the PrivateUse1 backend named "npu" and adds the `torch.npu` module. Shipped
torch_npu releases do not back `torch.accelerator.memory_*`, so memory figures come from `torch.npu` directly.
"""

from __future__ import annotations

import importlib

import torch

from polytrain.backends.base import AcceleratorBackend, Capabilities
from polytrain.errors import BackendError


def import_torch_npu() -> None:
    """Import torch_npu (which registers the npu device), or raise a one-line BackendError."""
    try:
        importlib.import_module("torch_npu")
    except ImportError as err:
        raise BackendError(
            f"--device npu needs torch_npu, which is not importable here ({err}). "
            "Install the torch_npu build matching your torch and CANN versions, or choose --device cpu|cuda|auto."
        ) from None


class NPUBackend(AcceleratorBackend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    def __init__(self) -> None:
        import_torch_npu()

    @classmethod
    def is_available(cls) -> bool:
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            return False
        return torch.npu.is_available()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            bf16=True,
            fp16=True,
            fp8=False,  # 910B / 910C have no FP8 compute
            grouped_mm=True,  # torch_npu maps aten::_grouped_mm to npu_grouped_matmul
            device_memory_stats=True,
            fused_attention=True,  # torch_npu.npu_fusion_attention
        )

    def describe(self) -> str:
        return f"npu ({torch.npu.device_count()} x {torch.npu.get_device_name()}, hccl)"
