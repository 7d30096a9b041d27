"""The one check of a parallel layout against a model, called by the engine at start-up (`ParallelDims.resolve`,
before any process group or model exists) and by the planner for every layout it considers (`plan.layout.Layout`):

- `problems`: why the layout cannot run this model at all, on any framework;
- `engine_gaps`: what polytrain's engine does not run yet (a layout other frameworks may run);
- `step_problems`: whether a step's batch splits over the layout (data-parallel ranks x micro-batches, enough
  micro-batches for the pipeline schedule), and `precision_gaps`: the arithmetic the engine trains in.

So the planner never recommends a layout the engine refuses, and the two never disagree on why.
"""

from __future__ import annotations

from dataclasses import dataclass

from polytrain.errors import ConfigError
from polytrain.models.common.config import ModelConfig
from polytrain.models.registry import spec_for
from polytrain.splits import batch_problems

ENGINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
"""Pipeline schedules the engine runs (torch.distributed.pipelining); the planner also models `dualpipe`."""
MULTI_STAGE = ("interleaved_1f1b", "zbv", "dualpipev")
"""Schedules with two stages per rank."""
ENGINE_PRECISIONS = ("bf16", "fp32")
"""Matrix-product precisions the engine trains in (`run.precision`; fp16 and fp8 training are not built)."""


@dataclass(frozen=True)
class Degrees:
    """A layout as both the engine's `[parallel]` section and the planner's Layout describe it."""

    dp: int = 1
    """Data-parallel ranks (replicas x shards)."""
    expert_ranks: int = 1
    """Ranks the routed experts are spread over: expert parallelism takes its `ep` ranks out of them."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    schedule: str = "1f1b"
    zero: int = 3
    offload: str = "none"
    experts_over_tp: bool = False
    """Expert parallelism spans the tensor-parallel ranks too (Megatron's expert tensor parallel 1)."""
    sequence_parallel: bool = True
    """With tp > 1, the residual stream is split by sequence position too (the planner always models it)."""


def problems(model: ModelConfig, d: Degrees) -> list[str]:
    """Why `d` cannot run `model` at all (empty: it can)."""
    out = []
    if model.n_routed_experts % d.ep:
        out.append(f"parallel.ep = {d.ep} must divide model.n_routed_experts = {model.n_routed_experts}")
    if d.expert_ranks % d.ep:
        out.append(f"parallel.ep = {d.ep} must divide the {d.expert_ranks} ranks the routed experts are spread over")
    for field, size in model.tensor_parallel_splits().items():
        if size % d.tp:
            out.append(f"parallel.tp = {d.tp} must divide model.{field} = {size}")
    stages = d.pp * (2 if d.pp > 1 and d.schedule in MULTI_STAGE else 1)
    if stages > model.num_hidden_layers:
        what = f"parallel.pp = {d.pp}" + (f" ({stages} stages with {d.schedule})" if stages > d.pp else "")
        out.append(f"{what} exceeds model.num_hidden_layers = {model.num_hidden_layers}: each stage needs at least "
                   "one layer")
    if d.schedule in ("dualpipe", "dualpipev") and d.pp > 1 and d.pp % 2:
        out.append(f"the {d.schedule} schedule needs an even number of pipeline stages (parallel.pp = {d.pp})")
    if d.offload == "all" and d.zero != 3:
        out.append("offloading everything needs ZeRO-3 (parameters sharded)")
    return out


def engine_gaps(model: ModelConfig, d: Degrees) -> list[str]:
    """What polytrain's engine does not run yet in `d` (empty: it runs the layout)."""
    spec = spec_for(model)
    gaps = []
    if d.cp > 1 and not spec.context_parallel:
        gaps.append(f"context parallel for {spec.architecture} models")
    if d.tp > 1 and spec.tensor_parallel is None:
        gaps.append(f"tensor parallel for {spec.architecture} models")
    elif d.tp > 1 and d.sequence_parallel and not spec.sequence_parallel:
        gaps.append(f"sequence parallel for {spec.architecture} models (set parallel.sequence_parallel = false)")
    if d.experts_over_tp or (d.dp * d.cp) % d.ep:
        gaps.append("ep drawn from tensor-parallel ranks (polytrain takes ep from the data- and context-parallel "
                    "shard ranks)")
    if d.zero == 1:
        gaps.append("ZeRO-1 (polytrain shards with FSDP: zero 2 or 3)")
    if d.offload == "optimizer":
        gaps.append("optimizer-only offload (polytrain offloads parameters, gradients and optimizer together)")
    if d.pp > 1 and model.tie_word_embeddings:
        gaps.append("tied input / output embeddings under pipeline parallelism (they live on different stages)")
    if d.pp > 1 and d.schedule not in ENGINE_SCHEDULES:
        gaps.append(f"the {d.schedule} schedule")
    return gaps


def check(model: ModelConfig, d: Degrees) -> None:
    """Raise ConfigError naming every reason the engine cannot run `d` on `model`."""
    found = problems(model, d) + [f"not supported yet: {gap}" for gap in engine_gaps(model, d)]
    if found:
        raise ConfigError("; ".join(found))


def step_problems(d: Degrees, global_batch: int, micro_batch: int) -> list[str]:
    """`batch_problems`, then whether each rank's micro-batches are enough for the pipeline schedule."""
    found = batch_problems(global_batch, micro_batch, d.dp)
    return found or pipeline_problems(d.schedule, d.pp, global_batch // (d.dp * micro_batch))


def precision_gaps(precision: str) -> list[str]:
    return [] if precision in ENGINE_PRECISIONS else [f"{precision} training (the engine trains in bf16 or fp32)"]


def pipeline_problems(schedule: str, pp: int, microbatches: int) -> list[str]:
    """Whether each rank's share of a step splits into enough micro-batches for the pipeline schedule."""
    if pp == 1:
        return []
    stages = pp * (2 if schedule in MULTI_STAGE else 1)
    out = []
    if microbatches < stages:
        out.append(f"the {schedule} pipeline schedule needs at least {stages} micro-batches per step and rank; "
                   f"there are {microbatches} (= global_batch_size / data-parallel ranks / micro_batch_size): "
                   "lower train.micro_batch_size or raise train.global_batch_size")
    if schedule == "interleaved_1f1b" and microbatches % pp:
        out.append(f"interleaved_1f1b needs micro-batches per step ({microbatches}) divisible by pp ({pp})")
    return out
