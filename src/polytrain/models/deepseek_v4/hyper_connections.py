"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): the residual stream is `hc_mult` parallel streams.

Before a sub-layer (attention or MoE), the streams are collapsed into its input with weights `pre`; after it, the
output is spread back with weights `post`, and the streams are mixed by `comb`, a matrix made doubly stochastic by
Sinkhorn-Knopp iterations (so mixing cannot blow the residual up). All three come from one linear map of the
RMS-normalised, flattened streams, computed in fp32.

Everything here is per token, so under sequence parallelism each tensor-parallel rank runs it on its own slice of
the sequence with the (replicated) weights; each rank's weight gradient then covers only its slice, and
`sequence_sum_grad` (set by parallel.tp) sums it over the ranks as the weights are read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models.deepseek_v4.config import DeepSeekV4Config


def _read(module: nn.Module, name: str) -> torch.Tensor:
    """A weight as the forward reads it, in fp32: through the sequence-parallel gradient sum when there is one
    (summed in fp32 whatever the parameters' dtype)."""
    weight = getattr(module, name).float()
    return weight if module.sequence_sum_grad is None else module.sequence_sum_grad(weight)


def _normalised_flat(streams: torch.Tensor, eps: float) -> torch.Tensor:
    flat = streams.flatten(2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    component = "hyper_connections"
    sequence_sum_grad: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: DeepSeekV4Config) -> None:
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, D] -> (post [B, S, n], comb [B, S, n, n], collapsed sub-layer input [B, S, D])."""
        n = self.n
        mixes = F.linear(_normalised_flat(streams, self.norm_eps), _read(self, "fn"))
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = _read(self, "base").split([n, n, n * n])
        pre_s, post_s, comb_s = _read(self, "scale").unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed


def merge(streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams: post spreads the sub-layer output; comb^T mixes the old streams (out_k = sum_j comb[j, k] in_j)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * output.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """Collapse the streams into one hidden state before the final norm (sigmoid weights, no mixing)."""

    component = "hyper_connections"
    sequence_sum_grad: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: DeepSeekV4Config) -> None:
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(_normalised_flat(streams, self.norm_eps), _read(self, "hc_fn"))
        pre = torch.sigmoid(mixes * _read(self, "hc_scale") + _read(self, "hc_base")) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
