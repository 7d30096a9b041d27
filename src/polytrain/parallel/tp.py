"""Tensor parallelism with DTensor `parallelize_module` (DeepSeek-V3 / MLA models).

Per block: the query / key-value up-projections (q_b_proj or q_proj, kv_b_proj) are split by head (column-wise),
the output projection by its input (row-wise, outputs summed across ranks); the dense MLP and the shared experts
split their hidden width. The low-rank down-projections, norms and the router stay replicated. The embedding is
split by vocabulary row, the output head by vocabulary column (logits gathered for the loss). Routed experts are
left to expert parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from polytrain.models.attention import MLA
from polytrain.models.layers import SwiGLU
from polytrain.parallel.fsdp import blocks_of


class SumGradOver:
    """Identity forward; backward sums the gradient over `group` (Megatron's copy-to-tensor-parallel region)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _SumGrad.apply(x, self.group)


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _mlp_plan(prefix: str) -> dict:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    parallelize_module(model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    for block in blocks_of(model):
        inner = getattr(block, "block", block)  # an MTP module wraps a block
        plan: dict = {}
        for name, module in inner.named_modules():
            if isinstance(module, MLA):
                query = "q_b_proj" if module.q_lora_rank else "q_proj"
                plan[f"{name}.{query}"] = ColwiseParallel()
                plan[f"{name}.kv_b_proj"] = ColwiseParallel()
                plan[f"{name}.o_proj"] = RowwiseParallel()
                module.shared_key_hook = SumGradOver(tp_mesh.get_group())
            elif isinstance(module, SwiGLU):
                plan.update(_mlp_plan(name))
        parallelize_module(inner, tp_mesh, plan)
