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
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from polytrain.models.attention import MLA
from polytrain.models.layers import SwiGLU
from polytrain.models.moe import MoE
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


def _block_plan(inner: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> dict:
    seq = Shard(1)
    plan: dict = {}
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(seq, None, None, None),
                                    desired_input_layouts=(Replicate(), None, None, None), use_local_output=True)
        plan.update({"input_layernorm": SequenceParallel(use_local_output=True), "self_attn": gather,
                     "post_attention_layernorm": SequenceParallel(use_local_output=True),
                     "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                               use_local_output=True)})
    for name, module in inner.named_modules():
        if isinstance(module, MLA):
            query = "q_b_proj" if module.q_lora_rank else "q_proj"
            plan[f"{name}.{query}"] = ColwiseParallel()
            plan[f"{name}.kv_b_proj"] = ColwiseParallel()
            plan[f"{name}.o_proj"] = RowwiseParallel(output_layouts=seq if sequence_parallel else Replicate())
            module.shared_key_hook = SumGradOver(tp_mesh.get_group())
        elif isinstance(module, SwiGLU):
            plan.update(_mlp_plan(name))
            if sequence_parallel and name == "mlp":  # the dense MLP returns to the sequence-split residual
                plan[f"{name}.down_proj"] = RowwiseParallel(output_layouts=seq)
        elif isinstance(module, MoE) and sequence_parallel:
            # routed experts see the whole (gathered) sequence; hand back this rank's part of it
            plan[f"{name}#out"] = PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(seq,),
                                                      use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """With `sequence_parallel`, the residual stream between blocks (and the norms on it) is split by sequence
    position across the tp ranks: gathered before attention / MLP, reduce-scattered after them."""
    seq = Shard(1)
    if sequence_parallel:
        top = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
               "norm": SequenceParallel(use_local_output=True),
               "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate())}
    else:
        top = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
               "lm_head": ColwiseParallel(output_layouts=Replicate())}
    parallelize_module(model, tp_mesh, top)
    for mtp in getattr(model, "mtp", []):
        if sequence_parallel:
            parallelize_module(mtp, tp_mesh, {
                "enorm": SequenceParallel(use_local_output=True),
                "hnorm": SequenceParallel(use_local_output=True),
                "norm": SequenceParallel(use_local_output=True),
                # a replicated weight applied to sequence shards: computed on the gathered input instead
                "eh_proj": ColwiseParallel(input_layouts=seq, output_layouts=seq),
            })
    for block in blocks_of(model):
        inner = getattr(block, "block", block)  # an MTP module wraps a block
        plan = _block_plan(inner, tp_mesh, sequence_parallel)
        outputs = {k[: -len("#out")]: v for k, v in plan.items() if k.endswith("#out")}
        parallelize_module(inner, tp_mesh, {k: v for k, v in plan.items() if not k.endswith("#out")})
        for name, style in outputs.items():
            parallelize_module(inner.get_submodule(name), tp_mesh, style)
