"""A preallocated cache of MLA latents for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Per layer: the normalised KV latent [B, S, kv_lora_rank] and the rotated shared key [B, S, rope_dim].

    `key_valid` [B, S] marks real (not left-padding) positions. `length` is how many positions are filled; a forward
    pass writes its new positions for every layer, then the model calls `advance`.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.latent = [torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_rot = [torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = latent.shape[1]
        end = self.length + new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; generation needs {end}")
        self.latent[layer][:, self.length : end] = latent
        self.k_rot[layer][:, self.length : end] = k_rot
        return self.latent[layer][:, :end], self.k_rot[layer][:, :end]

    def advance(self, valid: torch.Tensor) -> None:
        """Commit the positions just written; `valid` [B, new] marks which of them are real tokens."""
        end = self.length + valid.shape[1]
        self.key_valid[:, self.length : end] = valid
        self.length = end
