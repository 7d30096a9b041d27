"""DeepSeekMoE: a router, routed experts computed as one grouped GEMM over expert-sorted tokens, shared experts.

The module runs on one device; expert parallelism (polytrain.parallel) wraps it from outside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models.config import ModelConfig
from polytrain.models.layers import SwiGLU


def route(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token: returns (weights [N, k], expert indices [N, k]).

    `scores` [N, E] are the router affinities (sigmoid or softmax). The correction `bias` (aux-loss-free balancing)
    is added for the *choice* only: first the best `topk_group` of `n_group` groups, each ranked by the sum of its
    two highest biased scores, then the top-k experts inside those groups. The weights are the unbiased scores of
    the chosen experts, renormalised to sum to 1 when `norm_topk_prob`, times `scaling_factor`.
    """
    choice = scores if bias is None else scores + bias
    num_tokens, num_experts = scores.shape
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, indices


class Router(nn.Module):
    """Affinity scores in fp32 and group-limited top-k choice, with an aux-loss-free correction bias.

    While training, it counts how many tokens each expert received (`expert_load`); `update_router_biases`
    turns the counts into the bias update after each optimizer step.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        weights, indices = route(
            scores,
            self.e_score_correction_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts).float()
        return weights, indices


def grouped_swiglu_reference(
    x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Per-expert SwiGLU over contiguous token segments: the fallback where no grouped GEMM exists, and the
    reference the grouped path is tested against. Only experts that received tokens do any work."""
    outputs = []
    for expert, segment in enumerate(torch.split(x, counts)):
        if segment.shape[0] == 0:
            continue
        gate, up = F.linear(segment, gate_up[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, down[expert]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert-sorted tokens `x` [M, H]; expert e owns the next `counts[e]` rows.

    gate_up [E, 2I, H] and down [E, H, I] hold every expert's weights. Uses `torch._grouped_mm` (one kernel for all
    experts) where torch has it, otherwise `grouped_swiglu_reference`.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return grouped_swiglu_reference(x, counts.tolist(), gate_up, down)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    dtype = x.dtype
    hidden = _ContiguousGrad.apply(torch._grouped_mm(x, gate_up.to(dtype).transpose(-2, -1), offs=offsets))
    gate, up = hidden.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, down.to(dtype).transpose(-2, -1), offs=offsets)
    return _ContiguousGrad.apply(out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects the
    zero-stride gradients that e.g. `.sum()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class GroupedExperts(nn.Module):
    """All routed experts of a layer as two stacked weights (the layout expert parallelism shards by expert)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, dim, hidden = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights / indices [N, k] from the router. Returns the weighted sum of each token's experts."""
        top_k = indices.shape[1]
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        expert_out = grouped_swiglu(x[token_of], counts, self.gate_up_proj, self.down_proj)
        expert_out = expert_out * weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        return torch.zeros_like(x, dtype=expert_out.dtype).index_add_(0, token_of, expert_out).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat)
        out = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


def update_router_biases(
    model: nn.Module, rate: float, all_reduce: Callable[[torch.Tensor], None] | None = None
) -> dict[str, float]:
    """Aux-loss-free balancing: after an optimizer step, move each expert's correction bias by `rate` towards
    balance (up if it got fewer tokens than the mean, down if more), then clear the counts.

    `all_reduce` sums the counts over data-parallel ranks so every rank applies the same update. Returns the mean
    max/mean load ratio across layers (1.0 is perfectly balanced) for logging.
    """
    imbalance = []
    for module in model.modules():
        if not isinstance(module, Router):
            continue
        load = module.expert_load
        if all_reduce is not None:
            all_reduce(load)
        if load.sum() > 0:
            imbalance.append((load.max() / load.mean()).item())
            if rate > 0:
                module.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()
    return {"moe_load_max_over_mean": sum(imbalance) / len(imbalance)} if imbalance else {}
