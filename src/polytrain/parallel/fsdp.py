"""FSDP2 (`fully_shard`): every block, then the root; routed experts under expert parallelism get their own FSDP
over the expert-data-parallel mesh. Gradients are reduced as sums: the loss is already normalised by the global
token count, so averaging would divide twice."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, Shard

from polytrain.models.common.moe import GroupedExperts
from polytrain.parallel.config import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _skip_units_that_never_ran() -> None:
    """FSDP2 (a private class of torch 2.9 - 2.13, looked up defensively), after a backward without gradient
    reduction (micro-batches accumulating), upcasts every parameter's unsharded gradient, reading the unsharded
    parameter FSDP makes at its first all-gather: a unit that has not run forward yet (the MTP modules under RL
    objectives, which score the main head only) has none. Its reducing backward skips such parameters; make the
    accumulating one skip them too."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError:
        return
    original = getattr(FSDPParam, "to_accumulated_grad_if_needed", None)
    if original is None or getattr(original, "skips_unused", False):
        return

    def to_accumulated_grad_if_needed(self) -> None:
        if hasattr(self, "_unsharded_param"):
            original(self)

    to_accumulated_grad_if_needed.skips_unused = True
    FSDPParam.to_accumulated_grad_if_needed = to_accumulated_grad_if_needed


_skip_units_that_never_ran()


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP module's sharded parameters back on it (a no-op where they are). A forward without a
    backward (a log-prob pass, a rollout engine's sync check) leaves the root module's unsharded parameters
    registered: an optimizer built then would hold those instead of the shards (and train copies FSDP overwrites),
    and a checkpoint taken then could not name the optimizer's state."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The units FSDP and activation checkpointing wrap: decoder blocks and MTP modules."""
    return [*model.layers, *getattr(model, "mtp", [])]


def _options(cfg: ParallelConfig) -> dict:
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    # pinned host memory only helps (and only exists) with an accelerator
    offload = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if cfg.cpu_offload else OffloadPolicy()
    return dict(mp_policy=policy, offload_policy=offload)


def _sum_reductions(root: nn.Module) -> None:
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo, and some HCCL versions, lack PREMUL_SUM)
            module.set_force_sum_reduction_for_comms(True)


def even_shard_dim(group: int) -> Callable[[nn.Parameter], Shard]:
    """FSDP's placement for the stacked experts [E, ., .] of one rank: the first dimension `group` ranks split
    evenly. FSDP splits dim 0 as torch.chunk does and pads: 3 local experts over 8 expert-data-parallel ranks (V4-Pro,
    1,024 ranks, ep 128) would put one expert, mostly padding, on every rank, 2.7x the share."""

    def placement(param: nn.Parameter) -> Shard:
        shape = param.to_local().shape if isinstance(param, DTensor) else param.shape
        return Shard(next((d for d, size in enumerate(shape) if size % group == 0), 0))

    return placement


def _shard_blocks(blocks: list[nn.Module], dense_mesh: DeviceMesh, experts_mesh: DeviceMesh | None,
                  cfg: ParallelConfig) -> None:
    options = _options(cfg)
    for block in blocks:
        if experts_mesh is not None:
            for module in block.modules():
                if isinstance(module, GroupedExperts):
                    fully_shard(module, mesh=experts_mesh, reshard_after_forward=cfg.reshard_after_forward,
                                shard_placement_fn=even_shard_dim(experts_mesh.size()), **options)
        fully_shard(block, mesh=dense_mesh, reshard_after_forward=cfg.reshard_after_forward, **options)


def _shard_head(model: nn.Module, dense_mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """The output head as its own unit: losses call its methods outside the forward of the module holding it."""
    if model.config.tie_word_embeddings or getattr(model, "lm_head", None) is None:
        return
    fully_shard(model.lm_head, mesh=dense_mesh, reshard_after_forward=cfg.reshard_after_forward, **_options(cfg))
    register_fsdp_forward_method(model.lm_head, "loss_sum")


def apply_fsdp_to_stage(stage: nn.Module, dense_mesh: DeviceMesh, experts_mesh: DeviceMesh | None,
                        cfg: ParallelConfig) -> None:
    """FSDP for one pipeline stage: each of its layers and MTP modules, the output head, then the stage (embedding,
    norms)."""
    _shard_blocks([*stage.layers.values(), *getattr(stage, "mtp", [])], dense_mesh, experts_mesh, cfg)
    _shard_head(stage, dense_mesh, cfg)
    fully_shard(stage, mesh=dense_mesh, reshard_after_forward=False, **_options(cfg))
    _sum_reductions(stage)


def apply_fsdp(model: nn.Module, dense_mesh: DeviceMesh, experts_mesh: DeviceMesh | None, cfg: ParallelConfig) -> None:
    options = _options(cfg)
    _shard_blocks(blocks_of(model), dense_mesh, experts_mesh, cfg)
    _shard_head(model, dense_mesh, cfg)
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, **options)
    for method in getattr(model, "entry_points", ()):  # e.g. forward_train: FSDP gathers parameters around each
        register_fsdp_forward_method(model, method)
    _sum_reductions(model)
