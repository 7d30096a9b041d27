"""Global gradient-norm clipping across every mesh dimension.

Each gradient contributes the squares of its local shard; shards are summed over the mesh dimensions on which the
gradient is sharded (never over replicated ones, so replicated parameters count once), then over pipeline stages.
Parameters on different meshes (dense vs expert) are handled group by group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial


def global_grad_norm(params: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    plain = torch.zeros((), dtype=torch.float64)
    groups: dict[tuple[int, tuple[int, ...]], tuple[object, list[torch.Tensor]]] = {}
    for grad in grads:
        if isinstance(grad, DTensor):
            if any(isinstance(p, Partial) for p in grad.placements):
                raise RuntimeError("gradient with a Partial placement: reduce it before clipping")
            # every non-replicated dim holds distinct pieces (Shard, and FSDP's _StridedShard, whose is_shard()
            # is False on torch 2.13)
            dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
            key = (id(grad.device_mesh), dims)
            groups.setdefault(key, (grad.device_mesh, []))[1].append(grad.to_local())
        else:
            plain = plain + grad.detach().double().pow(2).sum().cpu()
    total = plain
    for (_, dims), (mesh, locals_) in groups.items():
        square = torch.stack([t.detach().double().pow(2).sum() for t in locals_]).sum()
        for dim in dims:
            square = square.to(mesh.device_type)
            dist.all_reduce(square, group=mesh.get_group(dim))
        total = total + square.cpu()
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   pp_group: dist.ProcessGroup | None = None) -> float:
    """Scale gradients so their global norm is at most `max_norm` (inf disables); returns the norm before.
    With pipeline stages, `pp_group` adds up the stages' (disjoint) parameters."""
    norm = float(global_grad_norm(params, pp_group))
    if math.isfinite(max_norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(scale)
    return norm
