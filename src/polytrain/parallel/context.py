"""Context parallelism: each row's sequence split over the `cp` ranks, in load-balanced causal chunks.

A row of width W is cut into 2 x cp chunks of W / (2 cp) tokens; cp rank r holds chunks r and 2cp-1-r. Under a
causal mask the late chunks see many keys and the early ones few, so pairing them gives every rank the same
attention work (a plain split would leave the last rank with (2cp-1) / cp times the average).

Attention across chunks: each rank all-gathers what keys and values are made of and attends its own queries over the
whole row. For MLA that is the normalised latent and the shared rotary key (kv_lora_rank + qk_rope_head_dim = 576
values per token for DeepSeek-V3), not the per-head keys and values (128 heads x (192 + 128) = 40,960 per token): the
all-gather moves (cp - 1) / cp x W x 576 values per layer and rank, 71x less than exchanging expanded K / V by
ring passes, and in one collective instead of cp - 1 steps. The price is that every rank expands the whole row's
latents (kv_b_proj) itself. The backward of the gather is a reduce-scatter: each rank's latent gradient is the
sum of what every rank's queries sent back to it.
"""

from __future__ import annotations

from torch import nn

from polytrain.models.common.context_split import ContextSplit

__all__ = ["ContextSplit", "apply_context_parallel"]


def apply_context_parallel(model: nn.Module, split: ContextSplit) -> None:
    """Tell the model and its attention modules their context-parallel group: every module with a
    `context_split` attribute (the model builds its masks from global positions, attention gathers its keys)."""
    for module in model.modules():
        if hasattr(module, "context_split"):
            module.context_split = split
