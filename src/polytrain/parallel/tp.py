"""Tensor parallelism with DTensor `parallelize_module`, following the plan the model's family spec gives
(`ModelSpec.tensor_parallel`, e.g. models/deepseek_v3/tp.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from polytrain.errors import ConfigError
from polytrain.models.registry import spec_for


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


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Parallelise `model` in place over `tp_mesh`. Modules with a `tp_sum_grad` attribute (a tensor every local
    head reads, whose gradient therefore sums over the ranks) get a `SumGradOver` the tensor-parallel group; under
    sequence parallelism so do modules with a `sequence_sum_grad` attribute (replicated weights applied per token
    to each rank's slice of the sequence, outside DTensor)."""
    spec = spec_for(model.config)
    if spec.tensor_parallel is None:
        raise ConfigError(f"parallel.tp > 1: the {spec.architecture} family has no tensor-parallel plan yet")
    for module, plan in spec.tensor_parallel(model, sequence_parallel):
        parallelize_module(module, tp_mesh, plan)
    for module in model.modules():
        if hasattr(module, "tp_sum_grad"):
            module.tp_sum_grad = SumGradOver(tp_mesh.get_group())
        if sequence_parallel and hasattr(module, "sequence_sum_grad"):
            module.sequence_sum_grad = SumGradOver(tp_mesh.get_group())
