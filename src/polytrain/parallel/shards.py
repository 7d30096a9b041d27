"""Which elements of a sharded tensor this rank holds, in global coordinates, and allocating a model built on the
meta device once it is laid out.

`local_indices(tensor)` gives, per dimension, the global indices of the local tensor's rows / columns: for a plain
tensor all of them; for a DTensor (FSDP, expert, tensor parallelism, and their compositions) what its placements
select, by DTensor's own sharding rules applied to one index vector per dimension (no communication), or for plain
Shard placements by the same arithmetic (a test holds the two equal). Initialisation (models/common/init.py) and sharded
loading (models/hf/checkpoint.py) use it to touch only this rank's elements.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from polytrain.models.common.init import full_indices, initialize, reset_buffers


def _along(placement: object, dim: int) -> object:
    """The placement of a 1-D index vector for dimension `dim`, given the tensor's placement on one mesh dim."""
    if isinstance(placement, _StridedShard) and placement.dim == dim:
        return _StridedShard(0, split_factor=placement.split_factor)
    if isinstance(placement, Shard) and placement.dim == dim:
        return Shard(0)
    return Replicate()


def local_indices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension, the global indices of the elements this rank holds of `tensor` (sorted as stored)."""
    if not isinstance(tensor, DTensor):
        return full_indices(tensor)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    out = []
    for dim, size in enumerate(tensor.shape):
        placements = [_along(p, dim) for p in tensor.placements]
        if all(isinstance(p, Replicate) for p in placements):
            out.append(torch.arange(size, device=mesh.device_type))
        elif coordinate is not None and not any(isinstance(p, _StridedShard) for p in placements):
            out.append(torch.arange(*_shard_range(size, placements, mesh.shape, coordinate), device=mesh.device_type))
        else:
            out.append(indices_by_dtensor(size, mesh, placements))
    return out


def _shard_range(size: int, placements: list[object], mesh_shape: tuple[int, ...],
                 coordinate: list[int]) -> tuple[int, int]:
    """[start, stop) of this rank's part of a dimension of `size` under plain Shard / Replicate placements: each
    mesh dimension in order splits the part left by the ones before it as torch.chunk does (DTensor's Shard: chunks
    of ceil(n / k), the last ones shorter or empty). The same as `indices_by_dtensor`, without making a view per
    rank of every mesh dimension (at 1,024 ranks that took a tenth of a second per tensor)."""
    start, stop = 0, size
    for placement, ranks, mine in zip(placements, mesh_shape, coordinate):
        if isinstance(placement, Shard):
            chunk = -(-(stop - start) // ranks)
            start, stop = min(start + mine * chunk, stop), min(start + (mine + 1) * chunk, stop)
    return start, stop


def indices_by_dtensor(size: int, mesh: DeviceMesh, placements: list[object]) -> torch.Tensor:
    """This rank's indices of a dimension of `size`, by DTensor's own sharding rules (one index vector distributed
    without communication): the reference for every placement, _StridedShard included."""
    index = torch.arange(size, device=mesh.device_type)
    return distribute_tensor(index, mesh, placements, src_data_rank=None).to_local()


def tensors_to_initialise(model: nn.Module, loads_checkpoint: bool, resumes: bool) -> tuple[str, ...] | None:
    """Which tensors of `model` need a random initialisation (None: all): none when a checkpoint of the run
    itself is restored, those a starting checkpoint lacks (e.g. a reward head) when one is loaded."""
    if resumes:
        return ()
    if loads_checkpoint:
        return tuple(getattr(model, "extra_parameters", ()))
    return None


@torch.no_grad()
def materialize(module: nn.Module, model: nn.Module, device: torch.device, seed: int | None,
                only: tuple[str, ...] | None = None) -> None:
    """Allocate `module` (the laid-out model, or this rank's pipeline stages: still on the meta device) on
    `device`, recompute its derived buffers and, with a seed, initialise this rank's shards of every tensor (or of
    those named in `only`) by the rules of `model` (the family's DecoderLM), as a function of (seed, name, global
    index) only."""
    module.to_empty(device=device)
    if module is model:
        model.tie_weights()
    reset_buffers(module)
    if seed is not None and only != ():
        initialize(module, seed, model.init_rule, local_indices, only)
