"""apply_parallelism: the order in which strategies are applied to an unmodified model, in one place.

Pipeline parallelism splits the result into stages (each FSDP-wrapped on its own) at the end.
1. tensor parallelism (DTensor plans on the tp mesh)
2. expert parallelism (routed experts sharded by expert over the ep mesh)
3. activation checkpointing (wraps blocks / modules; before FSDP so FSDP sees the wrappers)
   then, with parallel.compile, torch.compile on each block (regional compilation)
4. context parallelism (the attention modules learn their context-parallel group)
5. FSDP2 over the data- and context-parallel dims (experts over expert-data-parallel dims)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from polytrain.parallel.checkpointing import apply_activation_checkpointing
from polytrain.parallel.compile import apply_compile
from polytrain.parallel.config import ParallelConfig
from polytrain.parallel.context import apply_context_parallel
from polytrain.parallel.ep import apply_expert_parallel
from polytrain.parallel.fsdp import apply_fsdp, apply_fsdp_to_stage
from polytrain.parallel.mesh import Meshes
from polytrain.parallel.pp import Pipeline, StageIO
from polytrain.parallel.tp import apply_tensor_parallel


def _dp_mesh(mesh: DeviceMesh, replicate: int, shard_name: str) -> DeviceMesh:
    return mesh["dp_replicate", shard_name] if replicate > 1 else mesh[shard_name]


def apply_parallelism(
    model: nn.Module, meshes: Meshes | None, cfg: ParallelConfig, n_microbatches: int = 1,
    device: torch.device | None = None, io: StageIO | None = None,
) -> tuple[nn.Module, Pipeline | None]:
    """(the module to optimise and checkpoint, the pipeline when pp > 1)."""
    if meshes is None:
        apply_activation_checkpointing(model, cfg)
        if cfg.compile:
            apply_compile(model)
        return model, None
    dims = meshes.dims
    if dims.tp > 1:
        apply_tensor_parallel(model, meshes.dense["tp"], cfg.sequence_parallel)
    experts_mesh = None
    if dims.ep > 1:
        apply_expert_parallel(model, meshes.moe["ep"])
        experts_mesh = _dp_mesh(meshes.moe, dims.dp_replicate, "efsdp")
    apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model)
    dense_mesh = meshes.shard_mesh()
    split = meshes.context_split()
    if split is not None:
        apply_context_parallel(model, split)
    if dims.pp > 1:
        def wrap(stage: nn.Module) -> None:
            if dims.token_ranks > 1:
                apply_fsdp_to_stage(stage, dense_mesh, experts_mesh, cfg)

        pp_mesh = meshes.dense["pp"]
        pipeline = Pipeline(model, pp_mesh.get_group(), pp_mesh.get_local_rank(), dims.pp, cfg, n_microbatches,
                            io, device or torch.device("cpu"), wrap)
        return pipeline.group, pipeline
    if dims.token_ranks > 1:
        apply_fsdp(model, dense_mesh, experts_mesh, cfg)
    return model, None
