"""The dense definition of DeepSeek-V4 hybrid attention: every query against every key and every compressed entry
at once, with boolean masks. It materialises [B, H, S, S + T] logits and [B, S, H, T] indexer scores, so it is
for tests (the oracle the block-by-block `HybridAttention` must match) and for the attention benchmark, not for
training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polytrain.models.common.rope import RotaryEmbedding, apply_rotary_tail
from polytrain.models.deepseek_v4.attention import HybridAttention, Indexer, top_entries, visible_entries


def dense_index_choice(
    indexer: Indexer, x: torch.Tensor, q_latent: torch.Tensor, position_ids: torch.Tensor, rope: RotaryEmbedding
) -> torch.Tensor:
    """The lightning indexer's top-k visible entries per query [B, S, k] (-1 where fewer are visible)."""
    batch, seq, _ = x.shape
    keys = indexer.compressor(x, rope)  # [B, T, D]
    cos, sin = rope(position_ids)
    q = indexer.q_b_proj(q_latent).view(batch, seq, indexer.num_heads, indexer.head_dim).transpose(1, 2)
    q = apply_rotary_tail(q, cos, sin).transpose(1, 2)  # [B, S, H, D]
    scores = F.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * indexer.head_dim**-0.5
    weights = indexer.weights_proj(x).float() * indexer.num_heads**-0.5  # [B, S, H]
    index = (scores * weights.unsqueeze(-1)).sum(dim=2)  # [B, S, T]
    entries = keys.shape[1]
    if entries == 0:
        return index.new_zeros(batch, seq, 0, dtype=torch.long)
    return top_entries(index, visible_entries(position_ids, indexer.ratio, entries), indexer.topk)


def dense_hybrid_attention(
    attn: HybridAttention,
    x: torch.Tensor,
    ropes: dict[str, RotaryEmbedding],
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """`attn`'s output for `x` [B, S, hidden], computed densely."""
    batch, seq, _ = x.shape
    q, kv, q_latent = attn.project(x, tables)
    q = q.transpose(1, 2)  # [B, H, S, D]
    query_pos = torch.arange(seq, device=x.device)
    distance = query_pos[:, None] - query_pos[None, :]
    visible = ((distance >= 0) & (distance < attn.sliding_window)).expand(batch, 1, seq, seq)
    kv = kv.unsqueeze(1)  # [B, 1, S, D]
    if attn.compressor is not None:
        compressed = attn.compressor(x, ropes["compress"])  # [B, T, D]
        entries = compressed.shape[1]
        if attn.indexer is not None:
            chosen = dense_index_choice(attn.indexer, x, q_latent, position_ids, ropes["compress"])
            picked = torch.zeros(batch, seq, entries + 1, dtype=torch.bool, device=x.device)
            picked.scatter_(-1, chosen.masked_fill(chosen < 0, entries), True)
            block = picked[..., :entries]
        else:
            block = visible_entries(position_ids, attn.ratio, entries)
        kv = torch.cat([kv, compressed.unsqueeze(1)], dim=2)
        visible = torch.cat([visible, block.unsqueeze(1)], dim=-1)

    logits = torch.matmul(q, kv.transpose(-1, -2)) * attn.head_dim**-0.5  # [B, H, S, S + T]
    logits = logits.masked_fill(~visible, float("-inf"))
    sink = attn.sinks.to(logits.dtype).view(1, -1, 1, 1).expand(batch, -1, seq, 1)
    logits = torch.cat([logits, sink], dim=-1)
    probs = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]
    out = torch.matmul(probs.to(kv.dtype), kv)
    return attn.output(out.transpose(1, 2), tables)
