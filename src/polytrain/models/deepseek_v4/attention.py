"""DeepSeek-V4 hybrid attention: a sliding-window branch over full-resolution keys, plus (per layer) compressed
long-range entries, with one shared key/value head, a learned per-head attention sink and a grouped low-rank
output projection.

- Sliding-window-only layers (compress ratio 0): each query sees its last `sliding_window` tokens.
- HCA (heavily compressed attention, e.g. ratio 128): every `m` tokens are pooled (softmax-gated, with a learned
  per-slot bias) into one entry; a query sees every entry whose window lies entirely in its past.
- CSA (compressed sparse attention, ratio 4): overlapping windows of 2m tokens pooled the same way; a lightning
  indexer scores the entries per query (sum over heads of w * ReLU(q.k)) and the query sees only its top-k.
Keys and values are the same vector (shared-KV MQA); RoPE on its last `qk_rope_head_dim` channels is undone on
the output at the query position so every entry contributes as a function of relative distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.rope import RotaryEmbedding, apply_rotary_tail
from polytrain.models.deepseek_v4.config import DeepSeekV4Config


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Compressor(nn.Module):
    """Pool every `ratio` tokens into one key/value entry. With `overlap`, each token projects two series (Ca, Cb)
    and entry w pools window w-1's Ca with window w's Cb: width 2 x ratio, stride ratio."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        width = head_dim * (2 if overlap else 1)
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.kv_proj = nn.Linear(dim, width, bias=False)
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))
        self.kv_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        """x [B, S, dim] -> compressed entries [B, S // ratio, head_dim], rotated at their window's first position."""
        batch, seq, _ = x.shape
        m, d = self.ratio, self.head_dim
        windows = seq // m
        if windows == 0:
            return x.new_zeros(batch, 0, d)
        source = x[:, : windows * m]
        kv = self.kv_proj(source).view(batch, windows, m, -1)
        gate = self.gate_proj(source).view(batch, windows, m, -1) + self.position_bias
        if self.overlap:
            kv_both = kv.new_zeros(batch, windows, 2 * m, d)
            gate_both = gate.new_full((batch, windows, 2 * m, d), float("-inf"))
            kv_both[:, :, m:] = kv[..., d:]
            gate_both[:, :, m:] = gate[..., d:]
            kv_both[:, 1:, :m] = kv[:, :-1, :, :d]
            gate_both[:, 1:, :m] = gate[:, :-1, :, :d]
            kv, gate = kv_both, gate_both
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        compressed = self.kv_norm(pooled)
        positions = (torch.arange(windows, device=x.device) * m).expand(batch, windows)
        cos, sin = rope(positions)
        return apply_rotary_tail(compressed.unsqueeze(1), cos, sin).squeeze(1)


def visible_entries(position_ids: torch.Tensor, ratio: int, entries: int) -> torch.Tensor:
    """[B, S, T] True where compressed entry w lies wholly before or at the query: w < (t + 1) // ratio."""
    threshold = (position_ids + 1) // ratio
    return torch.arange(entries, device=position_ids.device).view(1, 1, -1) < threshold.unsqueeze(-1)


class Indexer(nn.Module):
    """Lightning indexer: its own overlapping compressor at `index_head_dim`, scored against queries from the
    attention's query latent; returns the top-k visible entries per query (-1 where fewer are visible)."""

    def __init__(self, config: DeepSeekV4Config, ratio: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.topk, self.ratio = (
            config.index_n_heads, config.index_head_dim, config.index_topk, ratio
        )
        self.compressor = Compressor(config.hidden_size, self.head_dim, ratio, True, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, position_ids: torch.Tensor, rope: RotaryEmbedding
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        keys = self.compressor(x, rope)  # [B, T, D]
        cos, sin = rope(position_ids)
        q = self.q_b_proj(q_latent).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary_tail(q, cos, sin).transpose(1, 2)  # [B, S, H, D]
        scores = F.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * self.head_dim**-0.5
        weights = self.weights_proj(x).float() * self.num_heads**-0.5  # [B, S, H]
        index = (scores * weights.unsqueeze(-1)).sum(dim=2)  # [B, S, T]
        entries = keys.shape[1]
        if entries == 0:
            return index.new_zeros(batch, seq, 0, dtype=torch.long)
        visible = visible_entries(position_ids, self.ratio, entries)
        top = index.masked_fill(~visible, float("-inf")).topk(min(self.topk, entries), dim=-1).indices
        return top.masked_fill(~visible.gather(-1, top), -1)


class HybridAttention(nn.Module):
    component = "attention"

    def __init__(self, config: DeepSeekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.sliding_window, self.o_groups, self.eps = config.sliding_window, config.o_groups, config.rms_norm_eps
        self.ratio = config.compress_ratio(layer_idx)
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        group_in = self.num_heads * self.head_dim // config.o_groups
        self.o_a_proj = nn.Linear(group_in, config.o_groups * config.o_lora_rank, bias=False)  # one block per group
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.ratio:
            sparse = self.ratio == config.compress_ratio_csa
            self.compressor = Compressor(config.hidden_size, self.head_dim, self.ratio, sparse, config.rms_norm_eps)
            if sparse:
                self.indexer = Indexer(config, self.ratio)

    def forward(
        self,
        x: torch.Tensor,
        ropes: dict[str, RotaryEmbedding],
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        kind = "compress" if self.ratio else "main"
        cos, sin = tables[kind]
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary_tail(unweighted_rms_norm(q, self.eps), cos, sin)
        kv = apply_rotary_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(1), cos, sin)  # [B, 1, S, D]

        query_pos = torch.arange(seq, device=x.device)
        distance = query_pos[:, None] - query_pos[None, :]
        visible = ((distance >= 0) & (distance < self.sliding_window)).expand(batch, 1, seq, seq)
        if self.compressor is not None:
            compressed = self.compressor(x, ropes["compress"])  # [B, T, D]
            entries = compressed.shape[1]
            if self.indexer is not None:
                chosen = self.indexer(x, q_latent, position_ids, ropes["compress"])  # [B, S, k], -1 = none
                picked = torch.zeros(batch, seq, entries + 1, dtype=torch.bool, device=x.device)
                picked.scatter_(-1, chosen.masked_fill(chosen < 0, entries), True)
                block = picked[..., :entries]
            else:
                block = visible_entries(position_ids, self.ratio, entries)
            kv = torch.cat([kv, compressed.unsqueeze(1)], dim=2)
            visible = torch.cat([visible, block.unsqueeze(1)], dim=-1)

        logits = torch.matmul(q, kv.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, S, S + T]
        logits = logits.masked_fill(~visible, float("-inf"))
        sink = self.sinks.to(logits.dtype).view(1, -1, 1, 1).expand(batch, -1, seq, 1)
        logits = torch.cat([logits, sink], dim=-1)
        probs = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]
        out = torch.matmul(probs.to(kv.dtype), kv)  # values are the keys
        out = apply_rotary_tail(out, cos, -sin).transpose(1, 2)  # undo the value's rotation at the query position

        groups = out.reshape(batch, seq, self.o_groups, -1)
        weight = self.o_a_proj.weight.view(self.o_groups, -1, groups.shape[-1])
        grouped = torch.einsum("bsgi,goi->bsgo", groups, weight)
        return self.o_b_proj(grouped.flatten(2))
