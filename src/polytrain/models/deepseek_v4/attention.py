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

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.rope import RotaryEmbedding, apply_rotary_tail
from polytrain.models.deepseek_v4.blockwise import QUERY_BLOCK, attend, entry_masks, hybrid_attention, visible_slots
from polytrain.models.deepseek_v4.config import DeepSeekV4Config

if TYPE_CHECKING:
    from polytrain.models.deepseek_v4.context import WholeRows
    from polytrain.models.deepseek_v4.kv_cache import V4KVCache
    from polytrain.models.deepseek_v4.packing import PackedEntries, PackedRows


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rotate_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_tail` on per-token heads x [B * S, H, D] with cos / sin [B, S, rope_dim / 2]."""
    return apply_rotary_tail(x, cos.reshape(x.shape[0], -1), sin.reshape(x.shape[0], -1))


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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token of x [B, N, dim]: (its key/value series, its gate logits before the per-slot bias)."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, windows: torch.Tensor, rope: RotaryEmbedding,
             kv_before: torch.Tensor | None = None, gate_before: torch.Tensor | None = None) -> torch.Tensor:
        """Entries [B, W, head_dim] of W windows from their tokens' kv / biased gates [B, W, m, width]; with
        overlap, also each window's previous window (kv_before / gate_before, the same shape; gates -inf where
        there is none). Each entry is rotated at its window's first position (`windows` [B, W]: the windows'
        indices)."""
        m, d = self.ratio, self.head_dim
        if self.overlap:  # entry w pools window w-1's Ca and window w's Cb
            assert kv_before is not None and gate_before is not None
            kv = torch.cat([kv_before[..., :d], kv[..., d:]], dim=2)
            gate = torch.cat([gate_before[..., :d], gate[..., d:]], dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        cos, sin = rope(windows * m)
        return apply_rotary_tail(self.kv_norm(pooled).unsqueeze(1), cos, sin).squeeze(1)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, packed: PackedEntries | None = None) -> torch.Tensor:
        """x [B, S, dim] -> compressed entries [B, S // ratio, head_dim]: one per whole window of `ratio` tokens
        (per document of packed rows), rotated at its window's first position."""
        if x.shape[1] < self.ratio:
            return x.new_zeros(x.shape[0], 0, self.head_dim)
        tokens, index, has_before = self._windows(x, packed)
        return self._pool_windows(*self.project(tokens), index, has_before, rope)

    def pool_row(self, kv: torch.Tensor, gate: torch.Tensor, rope: RotaryEmbedding,
                 packed: PackedEntries | None = None) -> torch.Tensor:
        """`forward` from the row's per-token projections kv / gate [B, S, width] (`project`): under context
        parallelism each rank projects its own tokens and the row's projections are gathered."""
        if kv.shape[1] < self.ratio:
            return kv.new_zeros(kv.shape[0], 0, self.head_dim)
        kv, index, has_before = self._windows(kv, packed)
        gate = self._windows(gate, packed)[0]
        return self._pool_windows(kv, gate, index, has_before, rope)

    def _windows(self, t: torch.Tensor, packed: PackedEntries | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token t [B, S, ...] -> (its windows' tokens [B, W, ratio, ...], the windows' indices [B, W], whether
        each window's previous window exists [B, W])."""
        batch, seq, m = t.shape[0], t.shape[1], self.ratio
        if packed is None:
            windows = seq // m
            index = torch.arange(windows, device=t.device).expand(batch, windows)
            return t[:, : windows * m].view(batch, windows, m, *t.shape[2:]), index, index > 0
        columns = packed.starts.unsqueeze(-1) + torch.arange(m, device=t.device)  # [B, W, m]
        return t[torch.arange(batch, device=t.device).view(-1, 1, 1), columns], packed.windows, packed.has_before

    def _pool_windows(self, kv: torch.Tensor, gate: torch.Tensor, index: torch.Tensor, has_before: torch.Tensor,
                      rope: RotaryEmbedding) -> torch.Tensor:
        gate = gate + self.position_bias
        if not self.overlap:
            return self.pool(kv, gate, index, rope)
        batch, windows = index.shape
        kv_before = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1)
        gate_before = torch.cat([gate[:, :1], gate[:, :-1]], dim=1)
        gate_before = gate_before.masked_fill(~has_before.view(batch, windows, 1, 1), float("-inf"))
        return self.pool(kv, gate, index, rope, kv_before, gate_before)


def visible_entries(position_ids: torch.Tensor, ratio: int, entries: int) -> torch.Tensor:
    """[B, S, T] True where compressed entry w lies wholly before or at the query: w < (t + 1) // ratio."""
    return visible_slots(entries, (position_ids + 1) // ratio)


def top_entries(index: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """The `topk` highest-scoring visible entries per query of index [..., T] (-1 where fewer are visible). Ties
    go to the earlier entry (a stable sort), so the choice does not depend on how many later entries exist: a
    KV-cached decode step, which holds room for entries not yet made, chooses as a full forward does."""
    ranked = index.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    top = ranked[..., : min(topk, index.shape[-1])]
    return top.masked_fill(~visible.gather(-1, top), -1)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter split by tensor parallelism (a DTensor); the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


INDEX_SCORE_ELEMENTS = 1 << 25
"""Bound on one block of indexer scores [B, queries, heads, T] (fp32): 128 MiB."""


class Indexer(nn.Module):
    """Lightning indexer: its own overlapping compressor at `index_head_dim`, scored against queries from the
    attention's query latent; returns the top-k visible entries per query (-1 where fewer are visible).

    The choice is an index, not a differentiable function, so it runs without autograd, a block of queries at a
    time (scores [B, block, heads, T] at most INDEX_SCORE_ELEMENTS), keeping only the top-k of each query."""

    def __init__(self, config: DeepSeekV4Config, ratio: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.topk, self.ratio = (
            config.index_n_heads, config.index_head_dim, config.index_topk, ratio
        )
        self.compressor = Compressor(config.hidden_size, self.head_dim, ratio, True, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, position_ids: torch.Tensor, rope: RotaryEmbedding
    ) -> torch.Tensor:
        return self.choose(self.compressor(x, rope), x, q_latent, position_ids, rope)

    @torch.no_grad()
    def choose(
        self, keys: torch.Tensor, x: torch.Tensor, q_latent: torch.Tensor, position_ids: torch.Tensor,
        rope: RotaryEmbedding, packed: PackedEntries | None = None,
    ) -> torch.Tensor:
        """The top-k of the indexer's compressed keys [B, T, D] for the queries of x [B, S, dim] at position_ids
        (of packed rows: among their document's entries)."""
        batch, seq, _ = x.shape
        entries = keys.shape[1]
        if entries == 0:
            return torch.zeros(batch, seq, 0, dtype=torch.long, device=x.device)
        keys = keys.float().transpose(-1, -2).unsqueeze(1)  # [B, 1, D, T]
        cos, sin = rope(position_ids)
        weights = self.weights_proj(x).float() * self.num_heads**-0.5  # [B, S, H]
        block = max(1, INDEX_SCORE_ELEMENTS // (batch * self.num_heads * entries))
        chosen = []
        for start in range(0, seq, block):
            end = min(start + block, seq)
            q = self.q_b_proj(q_latent[:, start:end]).view(batch, end - start, self.num_heads, self.head_dim)
            q = apply_rotary_tail(q.transpose(1, 2), cos[:, start:end], sin[:, start:end]).transpose(1, 2)
            scores = F.relu(torch.matmul(q.float(), keys)) * self.head_dim**-0.5  # [B, block, H, T]
            index = (scores * weights[:, start:end].unsqueeze(-1)).sum(dim=2)
            if packed is None:
                visible = visible_entries(position_ids[:, start:end], self.ratio, entries)
            else:
                visible = visible_slots(entries, packed.limit[:, start:end], packed.first[:, start:end])
            chosen.append(top_entries(index, visible, self.topk))
        return torch.cat(chosen, dim=1)


class HybridAttention(nn.Module):
    """Queries (low-rank, per-head RMS-normalised), one shared key/value head, optional compressed entries, the
    sink, the grouped output projection. The attention itself runs block by block (`blockwise.py`).

    Under tensor parallelism (models/deepseek_v4/tp.py) a rank holds a contiguous share of the heads and their
    output groups: the head count is read from q_b_proj's local output width, the sinks and o_a_proj's rows are
    the local part of split parameters."""

    component = "attention"
    tp_sum_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Set under tensor parallelism: applied to the shared keys / values and the compressed entries, which every
    local head reads, so that their gradient sums over the ranks' heads."""

    def __init__(self, config: DeepSeekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.sliding_window, self.o_groups, self.eps = config.sliding_window, config.o_groups, config.rms_norm_eps
        self.layer_idx, self.ratio = layer_idx, config.compress_ratio(layer_idx)
        self.query_block = QUERY_BLOCK
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

    def project(
        self, x: torch.Tensor, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotated queries [B, S, H, D], rotated shared keys / values [B, S, D], the query latent)."""
        batch, seq, _ = x.shape
        cos, sin = tables["compress" if self.ratio else "main"]
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent)
        heads = q.shape[-1] // self.head_dim  # this rank's under tensor parallelism
        q = q.view(batch * seq, heads, self.head_dim)
        q = rotate_tokens(unweighted_rms_norm(q, self.eps), cos, sin).view(batch, seq, heads, -1)
        kv = apply_rotary_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(1), cos, sin).squeeze(1)
        if self.tp_sum_grad is not None:
            kv = self.tp_sum_grad(kv)
        return q, kv, q_latent

    def output(self, out: torch.Tensor, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Undo the values' rotation at the query position (out [B, S, H, D]), then the grouped output projection:
        [B, S, hidden]."""
        batch, seq, heads = out.shape[:3]
        cos, sin = tables["compress" if self.ratio else "main"]
        out = rotate_tokens(out.reshape(batch * seq, heads, -1), cos, -sin)
        weight = local_part(self.o_a_proj.weight)  # [local groups x o_lora_rank, group width]
        groups = out.view(batch, seq, -1, weight.shape[-1])
        weight = weight.view(groups.shape[2], -1, weight.shape[-1])
        grouped = torch.einsum("bsgi,goi->bsgo", groups, weight)
        return self.o_b_proj(grouped.flatten(2))

    def forward(
        self,
        x: torch.Tensor,
        ropes: dict[str, RotaryEmbedding],
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
        cache: V4KVCache | None = None,
        packed: PackedRows | None = None,
        whole: WholeRows | None = None,
    ) -> torch.Tensor:
        """x [B, S, hidden] -> [B, S, hidden]. With `cache`: S > 1 prefills it (rows right-aligned), S == 1 is a
        decode step at position_ids [B, 1]. `packed`: the rows' document layout (packing.py). `whole`: under
        context parallelism, x holds this rank's chunks of the rows `whole` describes (context.py)."""
        q, kv, q_latent = self.project(x, tables)
        rope = ropes["compress"]
        if whole is not None:
            return self.output(self._attend_whole_rows(x, q, kv, q_latent, rope, position_ids, whole), tables)
        if cache is not None and x.shape[1] == 1:
            return self.output(self._decode(x, q, kv, q_latent, rope, position_ids[:, 0], cache), tables)
        entries = chosen = visible_count = entry_first = index_keys = None
        layout = None if packed is None or self.compressor is None else packed.entries[self.ratio]
        if self.compressor is not None:
            if self.indexer is not None:
                with torch.no_grad():
                    index_keys = self.indexer.compressor(x, rope, layout)
            entries, chosen, visible_count, entry_first = self._visibility(
                self.compressor(x, rope, layout), index_keys, x, q_latent, position_ids, rope, layout)
        out = hybrid_attention(q, kv, self.sliding_window, local_part(self.sinks), entries, chosen, visible_count,
                               self.query_block, entry_first, None if packed is None else packed.doc_start)
        if cache is not None:
            layer, lengths = cache.layers[self.layer_idx], cache.prefilling
            layer.prefill(kv, lengths)
            if layer.compressor is not None:
                layer.compressor.prefill(self.compressor, x, entries, lengths)
            if layer.index is not None:
                layer.index.prefill(self.indexer.compressor, x, index_keys, lengths)
        return self.output(out, tables)

    def _visibility(self, entries: torch.Tensor, index_keys: torch.Tensor | None, x: torch.Tensor,
                    q_latent: torch.Tensor, position_ids: torch.Tensor, rope: RotaryEmbedding,
                    layout: PackedEntries | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                           torch.Tensor | None]:
        """(entries, chosen, visible_count, entry_first) for hybrid_attention: the compressed entries (their
        gradient summed over tensor-parallel ranks), and which of them each query sees: the indexer's top-k
        (CSA; -1 = none), else every entry complete before it, from the row's start or (`layout`, the queries'
        packed documents) from its document's first entry."""
        if self.tp_sum_grad is not None:
            entries = self.tp_sum_grad(entries)
        if self.indexer is not None:
            return entries, self.indexer.choose(index_keys, x, q_latent, position_ids, rope, layout), None, None
        if layout is None:
            return entries, None, (position_ids + 1) // self.ratio, None
        return entries, None, layout.limit, layout.first

    def _attend_whole_rows(self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, q_latent: torch.Tensor,
                           rope: RotaryEmbedding, position_ids: torch.Tensor, whole: WholeRows) -> torch.Tensor:
        """This rank's queries (its two chunks of each row) over the whole rows' keys, gathered as context.py
        describes: [B, S, H, D]."""
        split = whole.split
        kv = split.gather(kv)
        entries = chosen = visible_count = entry_first = doc_start = layout = None
        if whole.packed is not None:
            doc_start = split.local(whole.packed.doc_start)
        if self.compressor is not None:
            layout = None if whole.packed is None else whole.packed.entries[self.ratio]
            series = [split.gather(t) for t in self.compressor.project(x)]
            index_keys = None
            if self.indexer is not None:
                with torch.no_grad():
                    index_series = [split.gather(t) for t in self.indexer.compressor.project(x)]
                    index_keys = self.indexer.compressor.pool_row(*index_series, rope, layout)
            local = None if layout is None else whole.local_entries(self.ratio)
            entries, chosen, visible_count, entry_first = self._visibility(
                self.compressor.pool_row(*series, rope, layout), index_keys, x, q_latent, position_ids, rope, local)
        width = q.shape[1] // 2
        outputs = []
        for part, chunk in enumerate(split.chunks()):
            mine = slice(part * width, (part + 1) * width)
            outputs.append(hybrid_attention(
                q[:, mine], kv, self.sliding_window, local_part(self.sinks), entries,
                *(None if t is None else t[:, mine] for t in (chosen, visible_count)), self.query_block,
                *(None if t is None else t[:, mine] for t in (entry_first, doc_start)), query_start=chunk * width))
        return torch.cat(outputs, dim=1)

    def _decode(self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, q_latent: torch.Tensor,
                rope: RotaryEmbedding, positions: torch.Tensor, cache: V4KVCache) -> torch.Tensor:
        """One new token per row against the cache: [B, 1, H, D]."""
        layer = cache.layers[self.layer_idx]
        keys, seen = layer.step(kv[:, 0], positions)
        entries = chosen = visible_count = None
        if layer.compressor is not None:
            layer.compressor.step(self.compressor, x[:, 0], positions, rope)
            entries = layer.compressor.entries
            if layer.index is not None:
                layer.index.step(self.indexer.compressor, x[:, 0], positions, rope)
                chosen = self.indexer.choose(layer.index.entries, x, q_latent, positions.view(-1, 1), rope)
            else:
                visible_count = ((positions + 1) // self.ratio).view(-1, 1)
        entry_mask = gather = None
        if entries is not None:
            entry_mask, gather = entry_masks(entries, chosen, visible_count, None)
        scale = self.head_dim**-0.5
        sinks = (local_part(self.sinks) / scale).view(-1, 1)
        return attend(q, keys, seen.unsqueeze(2), entries, entry_mask, gather, sinks, scale)
