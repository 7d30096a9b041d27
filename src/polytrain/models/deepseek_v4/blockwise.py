"""DeepSeek-V4 hybrid attention evaluated one block of queries at a time, so that memory grows linearly with
sequence length.

For the queries [s, e) a block needs only
- the sliding window's keys [s - window + 1, e): at most block + window - 1 of them;
- the compressed entries: all T = S / ratio of them for HCA (T is small: S / 128), or for CSA only the top-k
  each query's indexer chose, gathered per query ([B, Q, k, D]; while T is at most GATHER_ABOVE x k, all T
  entries under a mask instead);
- the per-head sink.
All of a query's candidates fit in one block, so each block takes an exact softmax over them: no running
(online) softmax is needed. Under autograd each block is recomputed in the backward pass (non-reentrant
checkpoint) instead of keeping its logits and probabilities: the step keeps only q, the keys and the entries, as a
fused attention kernel would. The dense definition in `attention_reference.py` is the test oracle.

A device may register a fused kernel "v4_hybrid_attention" (see `polytrain.backends.kernel`) with this module's
`hybrid_attention` signature; the block loop below is the portable fallback.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from polytrain.backends import kernel

QUERY_BLOCK = 256
"""Queries per block. Larger blocks mean fewer, larger matmuls and more transient memory: a block's logits are
[B, block, H, block + window - 1 + k]."""

GATHER_ABOVE = 2
"""CSA gathers each query's top-k entries only when there are more than GATHER_ABOVE x k of them; with fewer, one
product scores all entries and a mask keeps the chosen ones (fewer, larger matmuls, no gather / scatter)."""


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    entries: torch.Tensor | None,
    entry_mask: torch.Tensor | None,
    gather: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query block: q [B, Q, H, D] against the window's keys [B, L, D] and the compressed entries [B, T, D].
    key_mask [Q, 1, L] or, per row, [B, Q, 1, L]: True = visible. Either every entry is scored, entry_mask
    [B, Q, 1, T] hiding the ones a query may not see, or (CSA with many entries) each query's chosen entries are
    gathered: gather [B, Q, k] their indices, entry_mask [B, Q, 1, k] hiding the empty choices. sinks [H, 1]: each
    head's sink logit, divided by `scale`. Returns [B, Q, H, D]; keys double as values. Every product is one
    batched matmul over [queries x heads] rows: the shared keys are never copied per head."""
    batch, queries, heads, dim = q.shape
    rows = q.reshape(batch, queries * heads, dim)
    window = keys.shape[1]
    parts = [torch.bmm(rows, keys.transpose(1, 2)).view(batch, queries, heads, window).masked_fill(
        ~key_mask, float("-inf"))]
    gathered = None
    if gather is not None:
        gathered = entries[torch.arange(batch, device=q.device).view(-1, 1, 1), gather]  # [B, Q, k, D]
        picked = gather.shape[-1]
        scores = torch.bmm(q.reshape(batch * queries, heads, dim),
                           gathered.view(batch * queries, picked, dim).transpose(1, 2))
        parts.append(scores.view(batch, queries, heads, picked).masked_fill(entry_mask, float("-inf")))
    elif entries is not None:
        scores = torch.bmm(rows, entries.transpose(1, 2)).view(batch, queries, heads, entries.shape[1])
        parts.append(scores.masked_fill(entry_mask, float("-inf")))
    parts.append(sinks.to(parts[0].dtype).expand(batch, queries, heads, 1))
    probs = (torch.cat(parts, dim=-1) * scale).softmax(dim=-1).to(keys.dtype)
    out = torch.bmm(probs[..., :window].reshape(batch, queries * heads, window), keys)
    if gathered is not None:
        taken = probs[..., window:-1].reshape(batch * queries, heads, -1)
        out = out.view(batch * queries, heads, dim) + torch.bmm(taken, gathered.view(batch * queries, -1, dim))
    elif entries is not None:
        out = out + torch.bmm(probs[..., window:-1].reshape(batch, queries * heads, -1), entries)
    return out.view(batch, queries, heads, dim)


def visible_slots(slots: int, limit: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """[..., slots] True for the compressed entries first <= w < limit of each query (limit / first [...])."""
    slot = torch.arange(slots, device=limit.device)
    visible = slot < limit.unsqueeze(-1)
    return visible if first is None else visible & (slot >= first.unsqueeze(-1))


def entry_masks(
    entries: torch.Tensor, chosen: torch.Tensor | None, visible_count: torch.Tensor | None,
    entry_first: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(entry_mask [B, S, 1, T or k] True = hidden, gather [B, S, k] or None) of all queries, for `attend`."""
    slots = entries.shape[1]
    if chosen is not None and slots > GATHER_ABOVE * chosen.shape[-1]:
        return (chosen < 0).unsqueeze(2), chosen.clamp(min=0)
    if chosen is not None:  # few entries: score them all, keeping the chosen ones
        picked = torch.zeros(*chosen.shape[:-1], slots + 1, dtype=torch.bool, device=chosen.device)
        return ~picked.scatter_(-1, chosen.masked_fill(chosen < 0, slots), True)[..., :-1].unsqueeze(2), None
    return ~visible_slots(slots, visible_count, entry_first).unsqueeze(2), None


def hybrid_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    window: int,
    sinks: torch.Tensor,
    entries: torch.Tensor | None = None,
    chosen: torch.Tensor | None = None,
    visible_count: torch.Tensor | None = None,
    block: int = QUERY_BLOCK,
    entry_first: torch.Tensor | None = None,
    doc_start: torch.Tensor | None = None,
    query_start: int = 0,
) -> torch.Tensor:
    """Attention output [B, S, H, D] of queries q [B, S, H, D] over the shared keys / values kv [B, S', D] (query i
    sits at column c = query_start + i of kv: it sees keys c - window + 1 .. c, and none before its document's
    first column doc_start [B, S] in packed rows), the compressed entries [B, T, D] (HCA: those in
    [entry_first, visible_count) per query; CSA: the chosen [B, S, k], -1 = none) and one sink logit per head.
    A `query_start` > 0 is a context-parallel rank's chunk of a longer row (models/deepseek_v4/context.py)."""
    fused = kernel("v4_hybrid_attention", q.device.type)
    if fused is not None and query_start == 0 and kv.shape[1] == q.shape[1]:
        return fused(q, kv, window, sinks, entries, chosen, visible_count, entry_first, doc_start)
    seq = q.shape[1]
    scale = q.shape[-1] ** -0.5
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, kv, entries, sinks))
    entry_mask = gather = None
    if entries is not None:
        with torch.no_grad():
            entry_mask, gather = entry_masks(entries, chosen, visible_count, entry_first)
    sink_logits = (sinks / scale).view(-1, 1)
    columns = torch.arange(query_start + seq, device=q.device)
    steady = None  # the window mask of every block that starts a whole window in: one tensor for all of them
    outputs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        low, high = query_start + start, query_start + end  # the block's columns in kv
        first = max(0, low - window + 1)
        if first > 0 and end - start == block and steady is not None:
            key_mask = steady
        else:
            distance = columns[low:high].view(-1, 1) - columns[first:high]
            key_mask = ((distance >= 0) & (distance < window)).unsqueeze(1)  # [Q, 1, L]
            if first > 0 and end - start == block:
                steady = key_mask
        if doc_start is not None:  # [B, Q, 1, L]: not before the query's document
            key_mask = key_mask & (columns[first:high] >= doc_start[:, start:end, None]).unsqueeze(2)
        args = (
            q[:, start:end],
            kv[:, first:high],
            key_mask,
            entries,
            None if entry_mask is None else entry_mask[:, start:end],
            None if gather is None else gather[:, start:end],
            sink_logits,
            scale,
        )
        if recompute:
            outputs.append(checkpoint(attend, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outputs.append(attend(*args))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
