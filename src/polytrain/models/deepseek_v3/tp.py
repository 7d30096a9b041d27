"""The tensor-parallel plan of DeepSeek-V3 models (applied by polytrain.parallel.tp with DTensor's
`parallelize_module`).

Per block: the query / key-value up-projections (q_b_proj or q_proj, kv_b_proj) are split by head (column-wise),
the output projection by its input (row-wise, outputs summed across ranks); the dense MLP and the shared experts
split their hidden width. The low-rank down-projections, norms and the router stay replicated. The embedding is
split by vocabulary row, the output head by vocabulary column (logits gathered for the loss). Routed experts are
left to expert parallelism. With sequence parallelism the residual stream between blocks (and the norms on it) is
split by sequence position: gathered before attention / MLP, reduce-scattered after them.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from polytrain.models.common.layers import SwiGLU
from polytrain.models.common.moe import MoE
from polytrain.models.deepseek_v3.attention import MLA
from polytrain.models.deepseek_v3.model import DeepSeekV3LM

SEQ = Shard(1)


def _mlp_plan(prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def _block_plan(block: nn.Module, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    plan: dict[str, Any] = {}
    outputs: list[tuple[nn.Module, Any]] = []
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(SEQ, None, None, None),
                                    desired_input_layouts=(Replicate(), None, None, None), use_local_output=True)
        plan.update({"input_layernorm": SequenceParallel(use_local_output=True), "self_attn": gather,
                     "post_attention_layernorm": SequenceParallel(use_local_output=True),
                     "mlp": PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),),
                                               use_local_output=True)})
    for name, module in block.named_modules():
        if isinstance(module, MLA):
            query = "q_b_proj" if module.q_lora_rank else "q_proj"
            plan[f"{name}.{query}"] = ColwiseParallel()
            plan[f"{name}.kv_b_proj"] = ColwiseParallel()
            plan[f"{name}.o_proj"] = RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate())
        elif isinstance(module, SwiGLU):
            plan.update(_mlp_plan(name))
            if sequence_parallel and name == "mlp":  # the dense MLP returns to the sequence-split residual
                plan[f"{name}.down_proj"] = RowwiseParallel(output_layouts=SEQ)
        elif isinstance(module, MoE) and sequence_parallel:
            # routed experts see the whole (gathered) sequence; hand back this rank's part of it
            outputs.append((module, PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(SEQ,),
                                                        use_local_output=True)))
    return [(block, plan), *outputs]


def top_plan(sequence_parallel: bool) -> dict[str, Any]:
    """The model-level modules: the embedding split by vocabulary row, the head by vocabulary column (logits
    gathered); with sequence parallelism the embedding's output and the final norm split by position."""
    if sequence_parallel:
        return {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQ),
                "norm": SequenceParallel(use_local_output=True),
                "lm_head": ColwiseParallel(input_layouts=SEQ, output_layouts=Replicate())}
    return {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}


def tensor_parallel_plan(model: DeepSeekV3LM, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    plans: list[tuple[nn.Module, Any]] = [(model, top_plan(sequence_parallel))]
    for mtp in model.mtp:
        if sequence_parallel:
            plans.append((mtp, {
                "enorm": SequenceParallel(use_local_output=True),
                "hnorm": SequenceParallel(use_local_output=True),
                "norm": SequenceParallel(use_local_output=True),
                # a replicated weight applied to sequence shards: computed on the gathered input instead
                "eh_proj": ColwiseParallel(input_layouts=SEQ, output_layouts=SEQ),
            }))
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        plans += _block_plan(block, sequence_parallel)
    return plans
