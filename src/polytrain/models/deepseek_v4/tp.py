"""The tensor-parallel plan of DeepSeek-V4 models (applied by polytrain.parallel.tp with DTensor's
`parallelize_module`), without sequence parallelism.

Per block the attention heads are split: the query up-projection q_b_proj by head (column-wise), each head's sink
with it, and the grouped output projection by head group (o_a_proj's rows, one block per group: tp must divide
o_groups, and a group's heads are contiguous, so a rank's heads are exactly its groups' inputs), then o_b_proj by
its input (row-wise, outputs summed across ranks). The one shared key/value head and the compressed entries are
computed whole on every rank and read by every local head, so their gradient is summed over the ranks
(`HybridAttention.tp_sum_grad`). The lightning indexer (no gradient), the compressors, the query down-projection,
norms, hyper-connections (mHC), the router and the hash router stay replicated: every rank computes the same
values. The shared experts split their hidden width; routed experts are left to expert parallelism. The embedding
is split by vocabulary row, the output head by vocabulary column (logits gathered for the loss).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from polytrain.models.common.layers import SwiGLU
from polytrain.models.deepseek_v3.tp import _mlp_plan
from polytrain.models.deepseek_v4.attention import HybridAttention
from polytrain.models.deepseek_v4.model import DeepSeekV4LM


class ShardRows(ParallelStyle):
    """Split the named parameters of a module by their first dimension (Shard(0)); the module reads its rows
    locally (`local_part`). Its forward is left as it is."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name in self.names:
            param = getattr(module, name)
            module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, device_mesh, [Shard(0)]),
                                                         requires_grad=param.requires_grad))
        return module


def _attention_plan(name: str) -> dict[str, Any]:
    return {
        name: ShardRows("sinks"),
        f"{name}.q_b_proj": ColwiseParallel(),
        f"{name}.o_a_proj": ShardRows("weight"),
        f"{name}.o_b_proj": RowwiseParallel(output_layouts=Replicate()),
    }


def tensor_parallel_plan(model: DeepSeekV4LM, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    """`sequence_parallel` must be False (the engine refuses it for this family: validate.engine_gaps)."""
    if sequence_parallel:
        raise ValueError("DeepSeek-V4's tensor-parallel plan has no sequence parallelism")
    plans: list[tuple[nn.Module, Any]] = [(model, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })]
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        plan: dict[str, Any] = {}
        for name, module in block.named_modules():
            if isinstance(module, HybridAttention):
                plan.update(_attention_plan(name))
            elif isinstance(module, SwiGLU):
                plan.update(_mlp_plan(name))
        plans.append((block, plan))
    return plans
