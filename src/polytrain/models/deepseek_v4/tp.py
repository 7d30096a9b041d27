"""The tensor-parallel plan of DeepSeek-V4 models (applied by polytrain.parallel.tp with DTensor's
`parallelize_module`), with or without sequence parallelism.

Per block the attention heads are split: the query up-projection q_b_proj by head (column-wise), each head's sink
with it, and the grouped output projection by head group (o_a_proj's rows, one block per group: tp must divide
o_groups, and a group's heads are contiguous, so a rank's heads are exactly its groups' inputs), then o_b_proj by
its input (row-wise, outputs summed across ranks). The one shared key/value head and the compressed entries are
computed whole on every rank and read by every local head, so their gradient is summed over the ranks
(`HybridAttention.tp_sum_grad`). The lightning indexer (no gradient), the compressors, the query down-projection,
norms, hyper-connections (mHC), the router and the hash router stay replicated: every rank computes the same
values. The shared experts split their hidden width; routed experts are left to expert parallelism. The embedding
is split by vocabulary row, the output head by vocabulary column (logits gathered for the loss).

With sequence parallelism the hyper-connected streams between sub-layers are split by sequence position: the mHC
maps, the norms before each sub-layer and the final hyper head run on each rank's slice (their weights' gradients
summed over the ranks), the normalised input is all-gathered into attention / MoE (which see whole rows: windows,
compressed entries, hash routing and the balance loss need them) and their outputs reduce-scattered (o_b_proj) or
sliced (the MoE, whose output every rank holds whole) back to the rank's slice. MTP's projections of the
sequence-split embeddings and streams are computed on the gathered input, column-split, and returned split.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from polytrain.models.common.layers import SwiGLU
from polytrain.models.common.moe import MoE
from polytrain.models.deepseek_v3.tp import SEQ, _mlp_plan, top_plan
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


def _attention_plan(name: str, sequence_parallel: bool) -> dict[str, Any]:
    return {
        name: ShardRows("sinks"),
        f"{name}.q_b_proj": ColwiseParallel(),
        f"{name}.o_a_proj": ShardRows("weight"),
        f"{name}.o_b_proj": RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate()),
    }


def _gather(arguments: int) -> PrepareModuleInput:
    """All-gather a module's first argument (the sequence-split hidden states); the others pass as they are."""
    rest = (None,) * (arguments - 1)
    return PrepareModuleInput(input_layouts=(SEQ, *rest), desired_input_layouts=(Replicate(), *rest),
                              use_local_output=True)


def _sequence_plan(block: nn.Module) -> list[tuple[nn.Module, Any]]:
    """The sequence-parallel parts of a block: norms on the split streams, gathers into the sub-layers, the MoE's
    whole output back to this rank's slice."""
    plan = {"input_layernorm": SequenceParallel(use_local_output=True),
            "self_attn": _gather(7),  # (x, ropes, tables, position_ids, cache, packed, whole)
            "post_attention_layernorm": SequenceParallel(use_local_output=True),
            "mlp": _gather(3)}  # (x, input_ids, token_mask)
    moe = [m for m in block.modules() if isinstance(m, MoE)]
    return [(block, plan), *((m, PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(SEQ,),
                                                    use_local_output=True)) for m in moe)]


def tensor_parallel_plan(model: DeepSeekV4LM, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    plans: list[tuple[nn.Module, Any]] = [(model, top_plan(sequence_parallel))]
    if sequence_parallel:
        for mtp in model.mtp:  # replicated projections of split inputs: computed on the gathered input instead
            plans.append((mtp, {
                "enorm": SequenceParallel(use_local_output=True),
                "hnorm": SequenceParallel(use_local_output=True),
                "norm": SequenceParallel(use_local_output=True),
                "e_proj": ColwiseParallel(input_layouts=SEQ, output_layouts=SEQ),
                "h_proj": ColwiseParallel(input_layouts=SEQ, output_layouts=SEQ),
            }))
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        plan: dict[str, Any] = {}
        for name, module in block.named_modules():
            if isinstance(module, HybridAttention):
                plan.update(_attention_plan(name, sequence_parallel))
            elif isinstance(module, SwiGLU):
                plan.update(_mlp_plan(name))
        plans.append((block, plan))
        if sequence_parallel:
            plans += _sequence_plan(block)
    return plans
