"""DeepSeekMoE: a router, routed experts computed as one grouped GEMM over expert-sorted tokens, shared experts.

The module runs on one device; expert parallelism (polytrain.parallel) wraps it from outside.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polytrain.backends import kernel
from polytrain.models.common.config import ModelConfig
from polytrain.models.common.layers import SwiGLU, swiglu


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
    return expert_weights(scores, indices, norm_topk_prob, scaling_factor), indices


def expert_weights(scores: torch.Tensor, indices: torch.Tensor, norm_topk_prob: bool,
                   scaling_factor: float) -> torch.Tensor:
    """The chosen experts' (unbiased) scores, renormalised to sum to 1 when `norm_topk_prob`, times the scale."""
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. while recomputing a checkpointed forward)."""
    return torch._C._current_graph_task_id() != -1


def affinity(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router scores from logits: sigmoid (V3), softmax (V2), or sqrt(softplus) (V4)."""
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "softmax":
        return logits.softmax(dim=-1)
    return F.softplus(logits).sqrt()


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, rows: int, alpha: float, token_mask: torch.Tensor | None = None,
    context_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: alpha * mean over sequences of sum_i f_i * P_i, where f_i is expert
    i's share of the sequence's routed slots times E/K and P_i its mean normalised score over the sequence.
    A row of a packed batch counts as one sequence; padding (token_mask False) is left out, and so are rows of
    padding only (a fixed-shape pipeline micro-batch may hold some), so the mean is over the real sequences.

    `context_group`: the rows are split over these context-parallel ranks. The slot counts and token counts
    (no gradient) are summed over them; P_i's numerator stays local, so this rank returns its share of the loss,
    linear in its own scores, and the shares of the ranks add up to the loss of the whole rows, gradient included."""
    num_experts, top_k = scores.shape[1], indices.shape[1]
    scores = scores.view(rows, -1, num_experts)
    weight = (torch.ones(scores.shape[:2], device=scores.device) if token_mask is None
              else token_mask.view(rows, -1).to(scores.dtype))
    normalised = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.zeros(rows, num_experts + 1, device=scores.device, dtype=scores.dtype)
    slot_weight = weight.unsqueeze(-1).expand(-1, -1, top_k).reshape(rows, -1)
    counts[:, :num_experts].scatter_add_(1, indices.view(rows, -1), slot_weight)
    counts[:, num_experts] = weight.sum(dim=1)
    if context_group is not None:
        dist.all_reduce(counts, group=context_group)
    counts, present = counts[:, :num_experts], counts[:, num_experts]
    tokens = present.clamp(min=1).unsqueeze(-1)  # [rows, 1]
    f = counts * num_experts / (top_k * tokens)
    p = (normalised * weight.unsqueeze(-1)).sum(dim=1) / tokens
    real = (present > 0).to(scores.dtype)
    return alpha * ((f * p).sum(dim=1) * real).sum() / real.sum().clamp(min=1)


class Router(nn.Module):
    """Affinity scores in fp32 and group-limited top-k choice, with an aux-loss-free correction bias.

    While training, it counts how many tokens each expert received (`expert_load`); `update_router_biases`
    turns the counts into the bias update after each optimizer step. With `aux_loss_alpha` > 0 it also leaves
    the sequence-wise balance loss of its last training forward in `aux_loss`.
    """

    component = "router"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.context_split = None
        """With context parallelism (parallel/context.py): the balance loss counts over the whole rows."""
        self.routing_record: list[torch.Tensor] | None = None
        """When a list: every forward appends its chosen experts [N, k] (routing replay, while sampling)."""
        self.routing_override: tuple[torch.Tensor, torch.Tensor] | None = None
        """(experts [N, k], known [N]): use these experts where `known` (routing replay, while training)."""

    def reset_buffers(self) -> None:
        self.expert_load.zero_()

    def forward(
        self, x: torch.Tensor, rows: int = 1, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] (N = rows x tokens per row) -> (weights [N, k], expert indices [N, k]). Tokens where
        `token_mask` [N] is False (padding) are routed but neither counted in the expert load nor in the
        balance loss."""
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = affinity(logits, cfg.scoring_func)
        weights, indices = route(
            scores,
            self.e_score_correction_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        if self.routing_override is not None:
            forced, known = self.routing_override
            indices = torch.where(known.unsqueeze(-1), forced.to(indices.device), indices)
            weights = expert_weights(scores, indices, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        if self.routing_record is not None:
            self.routing_record.append(indices.detach().cpu())
        if self.training and not in_backward():  # activation recomputation must not count tokens twice
            with torch.no_grad():  # static shapes (no bincount, no boolean indexing): no host sync
                counts = (torch.ones_like(indices, dtype=torch.float32) if token_mask is None
                          else token_mask.reshape(-1, 1).expand_as(indices).float())
                self.expert_load.index_add_(0, indices.flatten(), counts.flatten())
        self.aux_loss = None
        if self.training and cfg.aux_loss_alpha > 0:
            group = self.context_split.group if self.context_split is not None else None
            aux_loss = sequence_balance_loss(scores, indices, rows, cfg.aux_loss_alpha, token_mask, group)
            # Activation recomputation runs the same ops (it checks that the same tensors are saved), but the loss
            # was taken from the first forward: a recomputed one kept here, never differentiated, would keep every
            # recomputed block's tensors alive until the next step.
            self.aux_loss = None if in_backward() else aux_loss
        return weights, indices


def grouped_swiglu_reference(
    x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor, limit: float = 0.0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert SwiGLU over contiguous token segments: the fallback where no grouped GEMM exists, and the
    reference the grouped path is tested against. Only experts that received tokens do any work. `scale` [M]
    multiplies each row's activation before the down projection (see `grouped_swiglu`)."""
    outputs = []
    scales = torch.split(scale, counts) if scale is not None else [None] * len(counts)
    for expert, (segment, factor) in enumerate(zip(torch.split(x, counts), scales)):
        if segment.shape[0] == 0:
            continue
        gate, up = F.linear(segment, gate_up[expert]).chunk(2, dim=-1)
        act = swiglu(gate, up, limit)
        if factor is not None:
            act = act * factor.unsqueeze(-1).to(act.dtype)
        outputs.append(F.linear(act, down[expert]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


def grouped_swiglu(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, limit: float = 0.0,
    scale: torch.Tensor | None = None, rows_of: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SwiGLU of expert-sorted tokens `x` [M, H]; expert e owns the next `counts[e]` rows.

    gate_up [E, 2I, H] and down [E, H, I] hold every expert's weights. `scale` [M], when given, multiplies each
    row's activation before the down projection: the routing weight applied at width I instead of H. `rows_of` =
    (tokens [N, H], index [M]), when x is tokens[index]: the first GEMM's weight gradient then gathers x again in
    backward instead of autograd keeping it (x is top-k times the size of the tokens, which the layer keeps anyway).
    Uses the device's grouped GEMM (one kernel for all experts: `Backend.kernels()["grouped_mm"]`) where it has one,
    otherwise `grouped_swiglu_reference`.
    """
    return _grouped_swiglu(x, counts, gate_up, down, limit, scale, rows_of)


def _grouped_swiglu_eager(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, limit: float,
    scale: torch.Tensor | None, rows_of: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    grouped_mm = kernel("grouped_mm", x.device.type)
    device = x.device.type
    # torch._grouped_mm is not an autocast op: cast as autocast casts a matmul (its fast kernels are bf16-only)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if grouped_mm is None or dtype not in (torch.float32, torch.bfloat16):
        return grouped_swiglu_reference(x, counts.tolist(), gate_up, down, limit, scale)
    if x.dtype != dtype:
        if rows_of is not None:  # keep the regather trick: gather from the cast tokens
            rows_of = (rows_of[0].to(dtype), rows_of[1])
            x = rows_of[0].index_select(0, rows_of[1])
        else:
            x = x.to(dtype)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    with _saved_as_gather(x, rows_of):
        hidden = _ContiguousGrad.apply(grouped_mm(x, gate_up.to(dtype).transpose(-2, -1), offsets))
    act = _ScaledSwiGLU.apply(hidden, scale, limit)
    out = grouped_mm(act, down.to(dtype).transpose(-2, -1), offsets)
    return _ContiguousGrad.apply(out)


@contextlib.contextmanager
def _saved_as_gather(rows: torch.Tensor, rows_of: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """Within this context, autograd saves `rows` (== tokens[index]) as the recipe (tokens, index) and gathers it
    again when backward needs it. Only that exact tensor: everything else is saved as usual. Like autograd's own
    saved tensors, the recipe refuses tokens modified in place after the forward (their version counter moved)."""
    if rows_of is None:
        yield
        return
    tokens, index = rows_of[0].detach(), rows_of[1]  # detach() shares the version counter
    # the same Python object for every view of one storage; held weakly: autograd keeps `pack` as long as the
    # tensors it saved, and a strong reference would keep the rows alive until backward after all
    storage = weakref.ref(rows.untyped_storage())
    key = (rows.storage_offset(), rows.shape, rows.stride(), rows.dtype)
    version = tokens._version

    def pack(t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        same = t.untyped_storage() is storage() and (t.storage_offset(), t.shape, t.stride(), t.dtype) == key
        return (tokens, index) if same else t

    def unpack(saved: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if not isinstance(saved, tuple):
            return saved
        if saved[0]._version != version:
            raise RuntimeError("the routed experts' input was modified in place after their forward; backward "
                               "would gather different token rows (set GroupedExperts.regather_rows = False)")
        return saved[0].index_select(0, saved[1])

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _ScaledSwiGLU(torch.autograd.Function):
    """swiglu(gate, up, limit) * scale for the first expert GEMM's output hidden [M, 2I] = [gate | up], scale [M]
    (or None), differentiated by formula from `hidden` and `scale` alone.

    Autograd through the elementwise ops would also keep silu(gate) and the unscaled product until backward: two more
    [tokens x top-k, I] tensors per MoE layer (for DeepSeek-V3's shapes a quarter of the routed experts' activations).
    Recomputing them in backward costs a few elementwise passes over [M, I] and no GEMM.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, scale: torch.Tensor | None, limit: float) -> torch.Tensor:
        ctx.save_for_backward(hidden, scale)
        ctx.limit = limit
        act = swiglu(*hidden.chunk(2, dim=-1), limit)
        return act if scale is None else act * scale.unsqueeze(-1).to(act.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # written to keep backward's own temporaries few: they add to the peak at this layer's backward
        hidden, scale = ctx.saved_tensors
        limit = ctx.limit
        gate, up = hidden.chunk(2, dim=-1)
        if limit > 0:
            inside_gate, inside_up = gate <= limit, up.abs() <= limit  # where the clamps pass the gradient
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        grad_hidden = torch.empty_like(hidden)
        grad_gate, grad_up = grad_hidden.chunk(2, dim=-1)
        grad_act = grad if scale is None else grad * scale.unsqueeze(-1).to(grad.dtype)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(grad_act, silu, out=grad_up)
        torch.mul(grad_act, up, out=grad_gate)
        del grad_act
        grad_gate.mul_(torch.rsub(sig, 1).mul_(gate).add_(1).mul_(sig))  # silu'(gate) = sig * (1 + gate * (1 - sig))
        del sig
        if limit > 0:
            grad_gate.mul_(inside_gate)
            grad_up.mul_(inside_up)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            grad_scale = silu.mul_(up).mul_(grad).sum(-1).to(scale.dtype)
        return grad_hidden, grad_scale, None


_grouped_swiglu = _grouped_swiglu_eager


def keep_grouped_gemm_out_of_graphs() -> None:
    """Make torch.compile leave the grouped GEMM path to eager mode (torch 2.13's fake grouped_mm accepts only
    bf16). Called by `polytrain.parallel.compile` before it compiles, not at import: `torch.compiler.disable`
    imports torch._dynamo, 1-2 s in every process of every job, compiled or not."""
    global _grouped_swiglu
    _grouped_swiglu = torch.compiler.disable(_grouped_swiglu_eager)


def expert_order(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed slots (token t's choice j is slot t * k + j) sorted by expert: (order [N*k], its inverse
    permutation, tokens per expert [E]). Row i of the expert-sorted tokens is slot order[i]."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    return order, inverse_permutation(order), counts


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (rows[order][inverse] == rows): one scatter, no second sort."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _ToSlots(torch.autograd.Function):
    """x [N, H] -> the expert-sorted rows [N*k, H] (row i is token order[i] // k). Its adjoint is `_FromSlots`:
    both directions are row gathers (no accumulating scatter) plus, towards tokens, a sum over the k choices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order, inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, inverse = ctx.saved_tensors
        return _FromSlots.apply(grad, order, inverse, ctx.top_k), None, None, None


class _FromSlots(torch.autograd.Function):
    """Expert-sorted rows [N*k, H] -> [N, H]: each token's k rows back in slot order, summed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order, inverse)
        ctx.top_k = top_k
        return rows.index_select(0, inverse).view(-1, top_k, rows.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, inverse = ctx.saved_tensors
        return _ToSlots.apply(grad, order, inverse, ctx.top_k), None, None, None


def to_expert_order(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token's row once per routed slot, sorted by expert ([N, H] -> [N*k, H]; see `expert_order`)."""
    return _ToSlots.apply(x, order, inverse, top_k)


def from_expert_order(rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """The inverse direction of `to_expert_order`: each token's k expert-sorted rows summed ([N*k, H] -> [N, H])."""
    return _FromSlots.apply(rows, order, inverse, top_k)


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
    """All routed experts of a layer as two stacked weights (the layout expert parallelism shards by expert).

    `dispatcher`, when set (by polytrain.parallel's expert parallelism), replaces the local computation: it is
    called as dispatcher(self, x, weights, indices) and must return the same [N, H] result.
    """

    component = "routed_experts"

    dispatcher: Callable[..., torch.Tensor] | None = None
    regather_rows: bool = True
    """Backward gathers the expert-sorted token rows again instead of keeping them (see `grouped_swiglu`'s rows_of).
    Off inside activation checkpointing, which recomputes the whole module anyway."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, dim, hidden = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = experts
        self.limit = config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights / indices [N, k] from the router. Returns the weighted sum of each token's experts."""
        if self.dispatcher is not None:
            return self.dispatcher(self, x, weights, indices)
        top_k = indices.shape[1]
        order, inverse, counts = expert_order(indices, self.num_experts)
        rows_of = (x, order // top_k) if self.regather_rows else None
        expert_out = grouped_swiglu(to_expert_order(x, order, inverse, top_k), counts, self.gate_up_proj,
                                    self.down_proj, self.limit, scale=weights.flatten()[order], rows_of=rows_of)
        return from_expert_order(expert_out, order, inverse, top_k).to(x.dtype)


class HashRouter(nn.Module):
    """DeepSeek-V4's first layers: experts come from a fixed token-id table `tid2eid` [vocab, k]; the learned gate
    only weights them (normalised scores of the table's experts, times routed_scaling_factor)."""

    component = "router"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok, dtype=torch.long))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = affinity(F.linear(x.float(), self.weight.float()), cfg.scoring_func)
        indices = self.tid2eid[input_ids.reshape(-1)]
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hash_routed: bool = False) -> None:
        super().__init__()
        self.gate: nn.Module = HashRouter(config) if hash_routed else Router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.swiglu_limit)
            if config.n_shared_experts
            else None
        )
        if self.shared_experts is not None:
            self.shared_experts.component = "shared_experts"

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, T, H]; input_ids [B, T] for hash routing; token_mask [B, T] False on padding."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if isinstance(self.gate, HashRouter):
            weights, indices = self.gate(flat, input_ids)
        else:
            weights, indices = self.gate(flat, rows=shape[0] if x.dim() == 3 else 1, token_mask=token_mask)
        out = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


def update_router_biases(
    model: nn.Module, rate: float, all_reduce: Callable[[torch.Tensor], None] | None = None
) -> dict[str, float]:
    """Aux-loss-free balancing: after an optimizer step, move each expert's correction bias by `rate` towards
    balance (up if it got fewer tokens than the mean, down if more), then clear the counts.

    `all_reduce` sums the counts over data-parallel ranks so every rank applies the same update. Returns the sum
    and the number of the layers' max/mean load ratios (1.0 is perfectly balanced), for logging.
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
    return {"load_ratio_sum": sum(imbalance), "layers": len(imbalance)}
