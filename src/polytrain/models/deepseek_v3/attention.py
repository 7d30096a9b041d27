"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with decoupled rotary position embedding.

Queries go through a low-rank bottleneck (q_a -> norm -> q_b). Keys and values are compressed into one
`kv_lora_rank`-wide latent plus a single `qk_rope_head_dim`-wide rotary key shared by all heads; `kv_b_proj`
expands the latent into per-head keys (no position part) and values. Only the latent and the rotary key are
cached during generation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from polytrain.models.common.context_split import ContextSplit
from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.rope import apply_rotary, rope_parameters
from polytrain.models.deepseek_v3.config import DeepSeekV3Config
from polytrain.models.deepseek_v3.kv_cache import KVCache


class MLA(nn.Module):
    component = "attention"

    tp_sum_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the rotary key that every head shares. Identity unless heads are split across ranks (tensor
    parallelism), where its gradient, summed over local heads only, must be summed over the ranks too."""

    context_split: ContextSplit | None = None
    """With context parallelism: the rank's queries attend over the whole row, whose latents and rotary keys are
    all-gathered from the context-parallel ranks (parallel/context.py says why these and not K / V)."""

    absorb_for_decode: bool = True
    """Decode steps (one new token, with a cache) attend in the latent space (see `_absorbed`)."""
    pad_values: bool = True
    """Pad values to the query head size so SDPA can use its fused kernels (see forward); off = the plain shapes."""

    def __init__(self, config: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        qk_head_dim = config.qk_head_dim
        dim = config.hidden_size

        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(dim, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        kv_b_width = self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, kv_b_width, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, dim, bias=config.attention_bias)
        # YaRN sharpens attention for long contexts: softmax scale x mscale(all_dim)^2
        self.softmax_scale = qk_head_dim**-0.5 * rope_parameters(config, config.qk_rope_head_dim, config.rope_theta)[2]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim]; mask [B, 1, T, S] boolean (True = may attend) or None for plain causal attention."""
        batch, seq, _ = x.shape
        cos, sin = rope
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        # head count from the tensor, not the config: under tensor parallelism each rank holds some of the heads
        q = q.view(batch, seq, -1, self.qk_nope_head_dim + self.qk_rope_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rotary(q_rot, cos, sin, self.rope_interleave)], dim=-1)

        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = apply_rotary(k_rot.unsqueeze(1), cos, sin, self.rope_interleave).squeeze(1)
        if self.tp_sum_grad is not None:
            k_rot = self.tp_sum_grad(k_rot)
        if self.context_split is not None and cache is None:
            latent, k_rot = self.context_split.gather(latent), self.context_split.gather(k_rot)
            # The whole row's per-head keys and values (cp x this rank's share) would stay saved for backward; the
            # gathered latents (576 values per token for V3, not 40,960) are kept instead and the expansion and
            # attention recomputed in backward.
            out = checkpoint(self._attend, q, latent, k_rot, mask, use_reentrant=False)
        else:
            if cache is not None:
                latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
                if seq == 1 and self.absorb_for_decode and not isinstance(self.kv_b_proj.weight, DTensor):
                    return self._absorbed(q_nope, q, latent, k_rot, mask)
            out = self._attend(q, latent, k_rot, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, q: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [B, H, T, qk_head_dim] over keys and values expanded from latent [B, S, kv_lora_rank] and
        the shared rotary key [B, S, rope_dim] -> [B, H, T, v_head_dim]."""
        batch, keys_len = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(batch, keys_len, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.unsqueeze(1).expand(-1, q.shape[1], -1, -1)], dim=-1)

        # Fused attention kernels (flash on CPU and GPU) need one head size for q, k and v; MLA's values are
        # narrower (V3: 128 vs 192), which would send SDPA to its unfused path (CPU, seq 1024: 7x slower forward +
        # backward). Zero columns appended to v give zero output columns, sliced off again: exact.
        v_dim = v.shape[-1]
        if self.pad_values and v_dim < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        seq = q.shape[2]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, scale=self.softmax_scale
        )[..., :v_dim]

    def _absorbed(
        self, q_nope: torch.Tensor, q: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of new queries over the cached latents without expanding them into per-head keys and values.

        kv_b_proj maps the latent c to each head's key (no position part) W_uk c and value W_uv c, so
        q_nope . (W_uk c) = (W_uk^T q_nope) . c and sum_s p_s W_uv c_s = W_uv (sum_s p_s c_s): the queries are
        absorbed into latent space and the output projected out of it once. A decode step then costs
        O(S * (kv_lora_rank + rope_dim)) per head instead of re-expanding all S cached latents
        (S * kv_lora_rank * heads * (nope + v)) every step.
        """
        batch, heads, seq, _ = q_nope.shape
        weight = self.kv_b_proj.weight.view(heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)
        q_rot = q[..., self.qk_nope_head_dim :]
        # heads folded into the query rows: every head reads the same cached latents (no per-head copies)
        scores = (q_latent.reshape(batch, heads * seq, -1) @ latent.transpose(1, 2)
                  + q_rot.reshape(batch, heads * seq, -1) @ k_rot.transpose(1, 2)).view(batch, heads, seq, -1)
        scores = scores.float() * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        context = (probs.view(batch, heads * seq, -1) @ latent).view(batch, heads, seq, -1)
        out = torch.einsum("bhtc,hvc->bhtv", context, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
