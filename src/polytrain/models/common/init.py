"""Initialisation that does not depend on the parallel layout.

A model is built on the meta device, sharded, then only each rank's shards are allocated and filled. For every rank
to fill its shard with exactly the values a single process would give the whole tensor, a value is a function of
(seed, tensor name, global element index) alone: a counter-based generator (a 64-bit integer hash of the three,
turned into uniforms and, by Box-Muller, normals), evaluated on the global indices of the elements a rank holds.
Which indices those are is the caller's knowledge (`local_indices`: polytrain.parallel.shards for sharded tensors);
the values are computed in bounded chunks, so filling a shard never needs more memory than a slice of it.

A module type's rule (`init_rule`) says how its tensors start: normal(0, std) for matrices, ones for norm scales,
zeros for biases, a random expert table for hash routers. Families extend the shared rules with their own modules
(`DecoderLM.init_rule`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.moe import GroupedExperts, HashRouter, Router

MASK64 = (1 << 64) - 1
CHUNK_ELEMENTS = 1 << 18
"""Elements computed at a time (their int64 indices and intermediates: 2 MiB each)."""
WRAPPER_TOKENS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

LocalIndices = Callable[[torch.Tensor], list[torch.Tensor]]
"""tensor -> per dimension, the global indices of the elements this process holds (for the local tensor)."""


@dataclass(frozen=True)
class InitRule:
    kind: str
    """"normal" (mean 0, standard deviation `value`), "constant" (`value`), or "expert_table" (each row: the first
    k of a random permutation of `value` experts, k = the row's width)."""
    value: float = 0.0


def shared_rule(module: nn.Module, name: str, std: float) -> InitRule | None:
    """The rule of tensor `name` of one of the shared blocks (None: not one of them)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return InitRule("normal", std) if name == "weight" else InitRule("constant", 0.0)
    if isinstance(module, RMSNorm):
        return InitRule("constant", 1.0)
    if isinstance(module, (Router, HashRouter)):
        if name == "weight":
            return InitRule("normal", std)
        if name == "tid2eid":
            return InitRule("expert_table", module.config.n_routed_experts)
        return InitRule("constant", 0.0)
    if isinstance(module, GroupedExperts):
        return InitRule("normal", std)
    return None


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Construct modules on the meta device without running torch.nn.init's initialisers (their values are drawn
    later by `initialize`; on meta tensors the initialisers only cost time, and they import torch._dynamo)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def tensor_key(seed: int, name: str) -> int:
    """A 64-bit key for (seed, tensor name), the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _to_signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a well-mixed hash of each value."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), one per int64 `index`, determined by (key, index) alone."""
    bits = _shift_right(_splitmix64(index ^ _to_signed(key)), 40)  # the top 24 bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """float32 standard normals (Box-Muller on two uniforms per index), determined by (key, index) alone."""
    u1 = uniform(key, 2 * index)
    u2 = uniform(key, 2 * index + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def full_indices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The LocalIndices of a tensor this process holds whole."""
    return [torch.arange(size, device=tensor.device) for size in tensor.shape]


def _global_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)  # a DTensor's shape is the global one


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def fill(tensor: torch.Tensor, rule: InitRule, key: int, indices: list[torch.Tensor]) -> None:
    """Write `rule`'s values for the elements at global `indices` (per dimension) into the local tensor."""
    local = _local(tensor)
    if local.numel() == 0:
        return
    if rule.kind == "constant":
        local.fill_(rule.value)
        return
    rows = indices[0].to(local.device)
    if rule.kind == "expert_table":  # row r: the first k of a random permutation of the experts, drawn from (key, r)
        experts, k = int(rule.value), local.shape[1]
        step = max(1, CHUNK_ELEMENTS // experts)
        for start in range(0, rows.numel(), step):
            chunk = rows[start : start + step]
            scores = uniform(key, chunk[:, None] * experts + torch.arange(experts, device=local.device))
            local[start : start + chunk.numel()].copy_(scores.argsort(dim=-1)[:, :k])
        return
    shape = _global_shape(tensor)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    local_strides = [math.prod(local.shape[d + 1 :]) for d in range(local.dim())]
    dims = [index.to(local.device) for index in indices]
    flat = local.view(-1) if local.is_contiguous() else torch.empty(local.numel(), dtype=local.dtype,
                                                                    device=local.device)
    # the common case (whole, or split along the first dimension only): the local elements are one global range
    whole_rows = all(index.numel() == n for index, n in zip(dims[1:], shape[1:]))
    first = dims[0] if dims else torch.zeros(1, dtype=torch.long)
    one_range = whole_rows and int(first[-1]) - int(first[0]) + 1 == first.numel()
    base = int(first[0]) * strides[0] if dims else 0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):  # bounded temporaries, whatever the tensor's shape
        position = torch.arange(start, min(start + CHUNK_ELEMENTS, flat.numel()), device=local.device)
        if one_range:
            index = position + base
        else:
            index = torch.zeros_like(position)
            for d, index_d in enumerate(dims):
                index += index_d[torch.div(position, local_strides[d], rounding_mode="floor") % local.shape[d]] * (
                    strides[d])
        flat[start : start + position.numel()].copy_(normal(key, index).mul_(rule.value))
    if not local.is_contiguous():
        local.copy_(flat.view(local.shape))


def clean_name(name: str) -> str:
    """A tensor's name in the unwrapped model (activation-checkpointing and compile wrappers removed)."""
    for token in WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


@torch.no_grad()
def initialize(model: nn.Module, seed: int, rule_of: Callable[[nn.Module, str], InitRule | None],
               local_indices: LocalIndices = full_indices, only: Collection[str] | None = None) -> None:
    """Fill every parameter and persistent buffer of `model` (its local shards, when sharded) by its rule, or only
    those named in `only` (the tensors a checkpoint about to be loaded lacks). `rule_of(module, tensor_name)`: the
    rule of a module's own tensor (None: left as it is)."""
    done: set[int] = set()  # a tied tensor (embedding = output head) is filled once, under its first name
    for module_name, module in model.named_modules(remove_duplicate=True):
        persistent = [n for n, _ in module.named_buffers(recurse=False)
                      if n not in getattr(module, "_non_persistent_buffers_set", set())]
        own = [*module.named_parameters(recurse=False), *((n, getattr(module, n)) for n in persistent)]
        for name, tensor in own:
            if id(tensor) in done:
                continue
            done.add(id(tensor))
            rule = rule_of(module, name)
            if rule is None:
                continue
            full_name = clean_name(f"{module_name}.{name}" if module_name else name)
            if only is not None and full_name not in only:
                continue
            fill(tensor, rule, tensor_key(seed, full_name), local_indices(tensor))


def reset_buffers(model: nn.Module) -> None:
    """Recompute the buffers that are derived, not learned (rotary frequencies, expert-load counters), e.g. after
    `to_empty` allocated them uninitialised."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()
