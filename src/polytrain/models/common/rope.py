"""Rotary position embedding: plain, or YaRN-scaled for extended context (DeepSeek-V3: factor 40 over 4K).

YaRN keeps the high-frequency dimensions (many rotations within the original context) as they are, divides the
low-frequency ones by `factor`, and blends linearly in between. It also changes attention temperature: cos / sin
are multiplied by an attention factor, and DeepSeek additionally multiplies the softmax scale by mscale(all_dim)^2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polytrain.models.common.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inverse_frequencies(dim: int, config: ModelConfig, theta: float) -> torch.Tensor:
    """Inverse frequencies for a `dim`-wide rotary part with YaRN interpolation (correction range truncated to
    whole dimensions, as in the reference implementation)."""
    factor = config.yarn_factor
    original = config.yarn_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(config.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1 where frequencies are kept as trained
    return interpolation * (1 - keep) + extrapolation * keep


def rope_parameters(
    config: ModelConfig, dim: int, theta: float, scaled: bool = True
) -> tuple[torch.Tensor, float, float]:
    """(inverse frequencies, cos/sin factor, softmax-scale factor) for a rotary part of width `dim`; `scaled`=False
    ignores the config's YaRN scaling (V4's sliding-window branch uses plain RoPE). The frequencies are computed on
    the host (a few values), also while a model is built on the meta device."""
    with torch.device("cpu"):
        return _rope_parameters(config, dim, theta, scaled)


def _rope_parameters(config: ModelConfig, dim: int, theta: float, scaled: bool) -> tuple[torch.Tensor, float, float]:
    if config.rope_scaling != "yarn" or not scaled:
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0, 1.0
    factor = config.yarn_factor
    if config.yarn_attention_factor:
        cos_factor = config.yarn_attention_factor
    elif config.yarn_mscale and config.yarn_mscale_all_dim:
        cos_factor = yarn_mscale(factor, config.yarn_mscale) / yarn_mscale(factor, config.yarn_mscale_all_dim)
    else:
        cos_factor = yarn_mscale(factor)
    softmax_factor = yarn_mscale(factor, config.yarn_mscale_all_dim) ** 2 if config.yarn_mscale_all_dim else 1.0
    return yarn_inverse_frequencies(dim, config, theta), cos_factor, softmax_factor


class RotaryEmbedding(nn.Module):
    """cos / sin tables [B, T, dim/2] from position ids (so packed documents restart at 0)."""

    def __init__(
        self, config: ModelConfig, dim: int | None = None, theta: float | None = None, scaled: bool = True
    ) -> None:
        super().__init__()
        self._parameters_of = (config, dim or config.qk_rope_head_dim, theta or config.rope_theta, scaled)
        inv_freq, self.cos_factor, self.softmax_factor = rope_parameters(*self._parameters_of)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies (a model built on the meta device allocates them uninitialised)."""
        self.inv_freq.copy_(rope_parameters(*self._parameters_of)[0])

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq
        return angles.cos() * self.cos_factor, angles.sin() * self.cos_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by the angles in cos / sin [B, T, D/2].

    interleave=True pairs (x0, x1), (x2, x3), ...; the output lists the rotated even elements, then the rotated odd
    ones: a fixed permutation of the pairwise (complex) rotation that leaves q.k unchanged because queries and keys
    get the same one. interleave=False pairs x[i] with x[i + D/2].
    """
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4 partial RoPE: rotate interleaved pairs of the *last* 2 x cos.shape[-1] channels of
    `x` [B, H, T, D] in place (layout kept), leaving the leading channels untouched. Computed in fp32."""
    rope_dim = 2 * cos.shape[-1]
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(1)
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    rotated_half = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, (rope * cos + rotated_half * sin).to(x.dtype)], dim=-1)
