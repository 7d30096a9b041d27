"""Activation checkpointing: recompute activations in backward instead of keeping them.

full: every block. selective: every `ac_every`-th block, plus, inside every block, the modules named in
`ac_modules` (mla_up_proj: the q_b / kv_b up-projections that expand MLA's latents; norm: RMSNorms; experts: the
routed experts, whose [tokens x top-k, 3 x moe_intermediate] activations, plus the received token rows under expert
parallelism, are an MoE layer's largest; mlp: dense MLPs and shared experts), the per-module recomputation
Megatron calls --recompute-modules.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from polytrain.models.common.layers import RMSNorm, SwiGLU
from polytrain.models.common.moe import GroupedExperts
from polytrain.parallel.config import ParallelConfig


def _wrap(module: nn.Module) -> nn.Module:
    # Inside the checkpointed region the experts' own saved-tensor hooks (GroupedExperts.regather_rows) would take
    # precedence over checkpointing's and keep the first expert GEMM's saved tensors (e.g. an autocast copy of the
    # weights) until backward: the region is recomputed anyway, so they keep their rows the plain way.
    for inner in module.modules():
        if isinstance(inner, GroupedExperts):
            inner.regather_rows = False
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)


def _wrap_children(parent: nn.Module, wanted: set[str]) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        if (
            ("mla_up_proj" in wanted and name in ("q_b_proj", "kv_b_proj"))
            or ("norm" in wanted and isinstance(child, RMSNorm))
            or ("experts" in wanted and isinstance(child, GroupedExperts))
            or ("mlp" in wanted and isinstance(child, SwiGLU))
        ):
            setattr(parent, name, _wrap(child))
            count += 1
        else:
            count += _wrap_children(child, wanted)
    return count


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> int:
    """Wrap modules in place; returns how many were wrapped."""
    if cfg.activation_checkpointing == "none":
        return 0
    count = 0
    holders = [(model.layers, i) for i in range(len(model.layers))]
    holders += [(model.mtp[k], "block") for k in range(len(getattr(model, "mtp", [])))]
    for position, (holder, key) in enumerate(holders):
        block = holder[key] if isinstance(key, int) else getattr(holder, key)
        whole = cfg.activation_checkpointing == "full" or (cfg.ac_every and position % cfg.ac_every == 0)
        if cfg.activation_checkpointing == "selective" and cfg.ac_modules and not whole:
            count += _wrap_children(block, set(cfg.ac_modules))
        if whole:
            wrapped = _wrap(block)
            if isinstance(key, int):
                holder[key] = wrapped
            else:
                setattr(holder, key, wrapped)
            count += 1
    return count
