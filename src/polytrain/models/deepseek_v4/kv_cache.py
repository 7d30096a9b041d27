"""DeepSeek-V4's decoding cache: per layer the sliding window's last keys, and for compressed layers the tokens of
the windows being filled, the entries made so far and (CSA) the lightning indexer's own entries.

Everything is indexed by each row's position, not by its column: rows are prefilled right-aligned (the model
moves a left-padded prompt batch so each row starts at column 0) and then decode one token per step, so rows of
different prompt lengths sit at different positions. Memory per row and layer is window x head_dim plus
max_len / ratio entries, whatever the generation length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v4.attention import Compressor


def ring_positions(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size]: the position each slot of a ring (slot = position % size) holds after `lengths` tokens (negative
    if none): the latest p < length with p % size == slot."""
    last = lengths.view(-1, 1) - 1
    slots = torch.arange(size, device=lengths.device)
    return last - (last - slots).remainder(size)


def _take(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, S, ...] at positions [B, K] (clamped into range; callers mask what is out of range)."""
    index = positions.clamp(0, values.shape[1] - 1)
    return values[torch.arange(values.shape[0], device=values.device).view(-1, 1), index]


@dataclass
class CompressorCache:
    """One compressor's state: the last 2 x ratio tokens' kv series and biased gates (slot = position % (2 ratio)),
    enough for the next entry and, with overlap, the window before it; and the entries made [B, max_len // ratio]."""

    kv: torch.Tensor
    gate: torch.Tensor
    entries: torch.Tensor

    @classmethod
    def empty(cls, compressor: Compressor, batch: int, max_len: int, dtype: torch.dtype,
              device: torch.device) -> CompressorCache:
        width = compressor.kv_proj.out_features
        ring = 2 * compressor.ratio
        return cls(torch.zeros(batch, ring, width, dtype=dtype, device=device),
                   torch.zeros(batch, ring, width, dtype=dtype, device=device),
                   torch.zeros(batch, max_len // compressor.ratio, compressor.head_dim, dtype=dtype, device=device))

    def prefill(self, compressor: Compressor, x: torch.Tensor, entries: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a forward over right-aligned rows x [B, S, dim] that made `entries` [B, S // ratio, D]."""
        held = ring_positions(lengths, self.kv.shape[1])  # only these tokens' projections are kept
        kv, gate = compressor.project(_take(x, held))
        self.kv.copy_(kv)
        self.gate.copy_(gate + compressor.position_bias[held.clamp(min=0) % compressor.ratio])
        self.entries[:, : entries.shape[1]] = entries[:, : self.entries.shape[1]]

    def step(self, compressor: Compressor, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> None:
        """Take one token per row (x [B, dim] at positions [B]); rows whose token closes a window make its entry."""
        m = compressor.ratio
        rows = torch.arange(x.shape[0], device=x.device)
        kv, gate = compressor.project(x)
        slot = positions % (2 * m)
        self.kv[rows, slot] = kv.to(self.kv.dtype)
        self.gate[rows, slot] = (gate + compressor.position_bias[positions % m]).to(self.gate.dtype)
        closes = (positions + 1) % m == 0
        if not bool(closes.any()):
            return
        window = positions // m  # [B]
        offsets = torch.arange(m, device=x.device)
        current = (window.view(-1, 1) * m + offsets) % (2 * m)  # [B, m] slots of the closing window
        kv_w = self.kv[rows.view(-1, 1), current].unsqueeze(1)
        gate_w = self.gate[rows.view(-1, 1), current].unsqueeze(1)
        kv_b = gate_b = None
        if compressor.overlap:  # with the window before it (gates -inf for the first window)
            before = (current + m) % (2 * m)
            kv_b = self.kv[rows.view(-1, 1), before].unsqueeze(1)
            gate_b = self.gate[rows.view(-1, 1), before].unsqueeze(1)
            gate_b = gate_b.masked_fill((window == 0).view(-1, 1, 1, 1), float("-inf"))
        made = compressor.pool(kv_w, gate_w, window.view(-1, 1), rope, kv_b, gate_b)[:, 0]
        target = window.clamp(max=self.entries.shape[1] - 1)
        keep = self.entries[rows, target]
        self.entries[rows, target] = torch.where(closes.view(-1, 1), made.to(keep.dtype), keep)


@dataclass
class LayerCache:
    """One layer: the window's keys (slot = position % window) with the positions they hold, and its compressors."""

    window: torch.Tensor
    window_pos: torch.Tensor
    compressor: CompressorCache | None
    index: CompressorCache | None

    def prefill(self, kv: torch.Tensor, lengths: torch.Tensor) -> None:
        held = ring_positions(lengths, self.window.shape[1])
        self.window.copy_(_take(kv, held))
        self.window_pos.copy_(held)

    def step(self, kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one key per row (kv [B, D] at positions [B]); (the window's keys [B, W, D], which of them each row's
        query sees [B, 1, W])."""
        rows = torch.arange(kv.shape[0], device=kv.device)
        slot = positions % self.window.shape[1]
        self.window[rows, slot] = kv.to(self.window.dtype)
        self.window_pos[rows, slot] = positions
        held = self.window_pos
        seen = (held >= 0) & (held <= positions.view(-1, 1)) & (held > positions.view(-1, 1) - held.shape[1])
        return self.window, seen.unsqueeze(1)


class V4KVCache:
    """The decoding cache of a DeepSeek-V4 model (`DeepSeekV4LM.new_cache`). `lengths` [B]: tokens each row holds.
    A forward with more than one token per row is a prefill of an empty cache; after it, one token per row."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int) -> None:
        param = model.embed_tokens.weight
        dtype, device = param.dtype, param.device
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.prefilling: torch.Tensor | None = None
        self.layers: list[LayerCache] = []
        for block in model.layers:
            attn = block.self_attn
            window = min(attn.sliding_window, max_len)
            self.layers.append(LayerCache(
                torch.zeros(batch, window, attn.head_dim, dtype=dtype, device=device),
                torch.full((batch, window), -1, dtype=torch.long, device=device),
                None if attn.compressor is None else CompressorCache.empty(attn.compressor, batch, max_len, dtype,
                                                                           device),
                None if attn.indexer is None else CompressorCache.empty(attn.indexer.compressor, batch, max_len,
                                                                        dtype, device),
            ))

    def begin(self, seq: int, lengths: torch.Tensor | None) -> None:
        """Before a forward of `seq` columns; `lengths` [B]: real tokens per row of a right-aligned prefill."""
        if seq > 1 and bool((self.lengths > 0).any()):
            raise ValueError("a DeepSeek-V4 KV cache is prefilled once, then decodes one token per row per step")
        if int(self.lengths.max()) + seq > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; generation needs "
                             f"{int(self.lengths.max()) + seq}")
        self.prefilling = lengths if seq > 1 else None

    def advance(self) -> None:
        self.lengths = self.prefilling.clone() if self.prefilling is not None else self.lengths + 1
        self.prefilling = None
