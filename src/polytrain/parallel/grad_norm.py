"""Global gradient-norm clipping across every mesh dimension.

Each gradient contributes the squares of its local shard; shards are summed over the mesh dimensions on which the
gradient is sharded (never over replicated ones, so replicated parameters count once), then over pipeline stages.
Parameters on different meshes (dense vs expert) are handled group by group. Squares are summed per tensor in
float32 on the device and accumulated in float64 on the host; the reductions go through
`parallel.collectives.sum_` (no float64 reaches a collective).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Partial

from polytrain.parallel.collectives import sum_


def _squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of `tensors` (float64, on the host)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors])
    return norms.double().cpu().pow(2).sum()


def reduce_partial_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients left as partial sums over their mesh dimensions (all-reduce), in place of `params`' grads.

    Under sequence parallelism a replicated weight applied to each tensor-parallel rank's slice of the sequence (the
    norms on the residual stream) gets from each rank only its slice's share of the gradient: a DTensor gradient
    with a Partial placement, accumulated as such over the micro-batches. FSDP reduces these itself (the parameters
    it gathers are DTensors made from local tensors, whose backward redistributes the gradient to the parameter's
    layout); without data parallelism (tp alone, or tp x pp) nothing else does, so this runs once per step."""
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and any(isinstance(p, Partial) for p in grad.placements):
            param.grad = grad.redistribute(placements=[Replicate() if isinstance(p, Partial) else p
                                                       for p in grad.placements])


def global_grad_norm(params: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """The L2 norm of all gradients of `params`, over every rank holding a piece of them; `device`: where the
    reductions run (the backend's device; the gradients' own by default)."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple[int, tuple[int, ...]], tuple[object, list[torch.Tensor]]] = {}
    plain: list[torch.Tensor] = []
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
            plain.append(grad)
    total = _squares(plain)
    for (_, dims), (mesh, locals_) in groups.items():
        square = _squares(locals_)
        for dim in dims:
            sum_(square, mesh.get_group(dim), device or locals_[0].device)
        total = total + square
    if pp_group is not None:
        sum_(total, pp_group, device or (grads[0].device if grads else torch.device("cpu")))
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> float:
    """Scale gradients so their global norm is at most `max_norm` (inf disables); returns the norm before.
    With pipeline stages, `pp_group` adds up the stages' (disjoint) parameters."""
    norm = float(global_grad_norm(params, pp_group, device))
    if math.isfinite(max_norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(scale)
    return norm
