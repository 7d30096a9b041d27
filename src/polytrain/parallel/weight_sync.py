"""Streamed weight sync: the policy's weights leave the trainer one bucket at a time, in Hugging Face names and
layouts, for a rollout engine (vLLM / vllm-ascend, or any `RolloutEngine`).

A sync never gathers the model. Its tensors are cut into the release's tensors (one per routed expert and
projection), which are packed in state-dict order into buckets of at most `bucket_bytes` (a tensor larger than that
travels alone). For each bucket every rank allocates one flat buffer of the bucket's size, writes into it the
elements of its shards that it owns, and the buffer is summed over the ranks onto the ranks that host an engine
(`reduce` to one, `all_reduce` to several). Exactly one rank owns each element: the shards of a DTensor are
disjoint, and among copies (replicated mesh dimensions, plain tensors held by every rank) one writes (`_owned`).
Every other rank writes zero there, so the sum is the element itself, bit for bit, in the dtype the engine serves.
A training rank's extra memory is that one buffer; the bucket is handed to the engine, and the next one is only
built once the engine has consumed it.

The plan (names, shapes, dtypes, buckets) depends only on the model's global shapes, so every rank computes the same
one without communication. Each bucket is one collective over the default process group, which every rank joins: the
sync is collective, like a training step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from polytrain.models.common.config import ModelConfig
from polytrain.models.hf.checkpoint import KEEP_FP32
from polytrain.models.hf.names import names_for
from polytrain.parallel.shards import local_indices

Bucket = list[tuple[str, torch.Tensor]]
"""(Hugging Face name, tensor) pairs, views of one flat buffer."""

DEFAULT_BUCKET_BYTES = 1 << 30


@dataclass(frozen=True)
class Piece:
    hf_name: str
    source: str
    """The polytrain tensor it is cut from."""
    region: tuple[int | slice, ...]
    """Where in the source (leading dimensions; empty: all of it)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    """Element offset in its bucket's buffer."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _region_shape(shape: tuple[int, ...], region: tuple[int | slice, ...]) -> tuple[int, ...]:
    kept = [len(range(*r.indices(n))) for r, n in zip(region, shape) if isinstance(r, slice)]
    return tuple(kept) + tuple(shape[len(region):])


def plan_buckets(state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[Piece]]:
    """The sync's buckets: every HF tensor of the model's export (`state`: its state dict), in the engine's
    `dtype` (the release's fp32 tensors and integer buffers keep theirs), grouped by dtype, each bucket at most
    `bucket_bytes` unless one tensor alone is larger."""
    names = names_for(config)
    pieces: list[tuple[str, str, tuple[int | slice, ...], tuple[int, ...], torch.dtype]] = []
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shape = tuple(tensor.shape)
        for hf, region in names.hf_regions(name, shape):
            out = tensor.dtype if not tensor.dtype.is_floating_point else (
                torch.float32 if KEEP_FP32.search(hf) else dtype)
            pieces.append((hf, name, region, _region_shape(shape, region), out))
    sources = {id(t): n for n, t in state.items()}
    for hf, tensor in names.shared_copies(state):
        pieces.append((hf, sources[id(tensor)], (), tuple(tensor.shape), dtype))

    buckets: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for hf, source, region, shape, out in pieces:
        size = math.prod(shape) * out.itemsize
        if current and (used + size > bucket_bytes or current[0].dtype != out):
            buckets.append(current)
            current, used = [], 0
        current.append(Piece(hf, source, region, shape, out, used // out.itemsize))
        used += size
    if current:
        buckets.append(current)
    return buckets


def _owned(state: dict[str, torch.Tensor], device: torch.device) -> set[str]:
    """The tensors of which this rank writes its elements: exactly one writer per element over the world.

    A candidate is a rank at coordinate 0 of every replicated dimension of the tensor's mesh (a plain tensor: every
    rank). Copies can also live outside the mesh (a norm weight sharded over the data-parallel ranks of each tensor-
    parallel rank lives on several such meshes), so of the candidates only those of the mesh with the lowest first
    rank write (a plain tensor: the lowest rank); one all-reduce (min) over all tensors decides it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    never = torch.iinfo(torch.int64).max
    claim = torch.full((len(state),), never, dtype=torch.int64)
    for i, tensor in enumerate(state.values()):
        if not isinstance(tensor, DTensor):
            claim[i] = rank
            continue
        coordinate = tensor.device_mesh.get_coordinate()
        if coordinate is not None and all(c == 0 for c, p in zip(coordinate, tensor.placements)
                                          if isinstance(p, Replicate)):
            claim[i] = int(tensor.device_mesh.mesh.min())
    lowest = claim.to(device, copy=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return {name for name, mine, first in zip(state, claim.tolist(), lowest.tolist())
            if mine != never and mine == first}


def _as_index(positions: torch.Tensor) -> slice | torch.Tensor:
    """A slice when `positions` is a contiguous run (the usual shard), else the index tensor."""
    if positions.numel() and int(positions[-1] - positions[0]) + 1 == positions.numel():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def _write_owned(piece: Piece, tensor: torch.Tensor, indices: list[torch.Tensor], out: torch.Tensor) -> None:
    """Copy the elements of `piece` that this rank's shard of `tensor` holds into `out` (the piece's view)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()
    source: list[slice | torch.Tensor] = []  # per local dimension, which local rows to take
    dest: list[slice | torch.Tensor] = []  # per piece dimension, where they go
    for dim, index in enumerate(indices):
        index = index.to(local.device)
        region = piece.region[dim] if dim < len(piece.region) else slice(None)
        if isinstance(region, int):
            hits = (index == region).nonzero().flatten()
            if hits.numel() == 0:
                return
            source.append(slice(int(hits[0]), int(hits[0]) + 1))
            continue
        start, stop, _ = region.indices(tensor.shape[dim])
        keep = ((index >= start) & (index < stop)).nonzero().flatten()
        if keep.numel() == 0:
            return
        source.append(_as_index(keep))
        dest.append(_as_index(index[keep] - start))
    block = local
    for dim, rows in enumerate(source):  # one dimension at a time: slices are views, index tensors gather
        block = block[(slice(None),) * dim + (rows,)]
    block = block.reshape([n for n, r in zip(block.shape, piece.region) if not isinstance(r, int)]
                          + list(block.shape[len(piece.region):])) if piece.region else block
    if all(isinstance(d, slice) for d in dest):
        out[tuple(dest)].copy_(block)
        return
    target = [torch.arange(*d.indices(out.shape[i])) if isinstance(d, slice) else d for i, d in enumerate(dest)]
    grid = [t.view([-1 if j == i else 1 for j in range(len(target))]).to(out.device) for i, t in enumerate(target)]
    out.index_put_(tuple(grid), block.to(out.device, out.dtype))


def hf_weight_buckets(model: nn.Module, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, receivers: list[int] | None = None,
                      device: torch.device | None = None) -> Iterator[Bucket]:
    """Yield the model's weights as buckets of (HF name, tensor), assembled on the `receivers` ranks (default:
    rank 0); other ranks get empty buckets. Collective: every rank must iterate to the end."""
    state = model.state_dict()
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() if dist.is_initialized() else 0
    receivers = receivers if receivers is not None else [0]
    receive = me in receivers
    first = next(iter(state.values()))
    where = device or (first.device if first.device.type != "meta" else torch.device("cpu"))
    owned = _owned(state, where)
    indices = {}
    for bucket in plan_buckets(state, config, dtype, bucket_bytes):
        total = bucket[-1].offset + bucket[-1].numel
        flat = torch.zeros(total, dtype=bucket[0].dtype, device=where)
        for piece in bucket:
            tensor = state[piece.source]
            if piece.source not in owned:
                continue
            if piece.source not in indices:
                indices = {piece.source: local_indices(tensor)}  # one source tensor's indices at a time
            _write_owned(piece, tensor, indices[piece.source],
                         flat[piece.offset : piece.offset + piece.numel].view(piece.shape))
        if world > 1:
            if len(receivers) == 1:
                dist.reduce(flat, dst=receivers[0])
            else:
                dist.all_reduce(flat)
        if not receive:
            del flat
            yield []
            continue
        yield [(p.hf_name, flat[p.offset : p.offset + p.numel].view(p.shape)) for p in bucket]
        del flat


def receiving_ranks(receives: bool, device: torch.device) -> list[int]:
    """The ranks whose `receives` is true (one all-reduce); rank 0 alone when none is."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [0]
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    flags[dist.get_rank()] = int(receives)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f] or [0]

