"""Huawei Ascend NPUs through torch_npu: HCCL collectives.

torch_npu registers itself as the PrivateUse1 backend named "npu" and adds the `torch.npu` module. Shipped
torch_npu releases do not back `torch.accelerator.memory_*`, so memory figures come from `torch.npu` directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from polytrain.backends.base import AcceleratorBackend, Capabilities
from polytrain.errors import BackendError

# HcclAllReduce's dataType on Atlas A2 / A3 training products (CANN HCCL API reference): int8, int16, int32, int64,
# float16, float32, bfp16 (no float64: only intra-node on the newest parts). uint8 moves as bytes (object
# collectives, checkpoint metadata) in all-gather / broadcast.
HCCL_DTYPES = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                         torch.bfloat16})


def import_torch_npu() -> None:
    """Import torch_npu (which registers the npu device), or raise a one-line BackendError."""
    try:
        importlib.import_module("torch_npu")
    except ImportError as err:
        raise BackendError(
            f"--device npu needs torch_npu, which is not importable here ({err}). "
            "Install the torch_npu build matching your torch and CANN versions, or choose --device cpu|cuda|auto."
        ) from None


class NPUGroupedMatmul(torch.autograd.Function):
    """Grouped GEMM on Ascend: x [M, K] (rows sorted by group), weight [E, K, N], offsets [E] cumulative row counts.

    Forward and the input gradient split x's rows by group (group_type 0); the weight gradient splits the shared
    K-by-rows product by group (group_type 2), giving one [K, N] block per expert. group_list_type 0 = cumulative.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        import torch_npu

        group_list = offsets.to(torch.int64)
        ctx.save_for_backward(x, weight, group_list)
        return torch_npu.npu_grouped_matmul([x], [weight], group_list=group_list, split_item=3, group_type=0,
                                            group_list_type=0)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch_npu

        x, weight, group_list = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch_npu.npu_grouped_matmul([grad], [weight.transpose(1, 2).contiguous()], group_list=group_list,
                                             split_item=3, group_type=0, group_list_type=0)[0]
        grad_w = torch_npu.npu_grouped_matmul([x.t().contiguous()], [grad], group_list=group_list, split_item=3,
                                             group_type=2, group_list_type=0)[0]
        return grad_x, grad_w.view_as(weight), None


class NPUBackend(AcceleratorBackend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    collective_dtypes = HCCL_DTYPES

    def __init__(self) -> None:
        import_torch_npu()

    @classmethod
    def create(cls) -> NPUBackend:
        import_torch_npu()
        if not cls.is_available():
            raise BackendError(
                "--device npu: torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
            )
        return cls()

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
            grouped_mm=True,  # torch_npu.npu_grouped_matmul (see kernels)
            device_memory_stats=True,
            fused_attention=True,  # torch_npu.npu_fusion_attention
        )

    def kernels(self) -> dict[str, Callable[..., torch.Tensor]]:
        return {"grouped_mm": NPUGroupedMatmul.apply}

    def describe(self) -> str:
        return f"npu ({torch.npu.device_count()} x {torch.npu.get_device_name()}, hccl)"
