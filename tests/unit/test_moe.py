"""MoE experts: the grouped (sorted-token) computation equals a per-token dense reference, forward and backward."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from polytrain.models import preset
from polytrain.models.common.layers import swiglu
from polytrain.models.common.moe import (
    MoE,
    _ScaledSwiGLU,
    expert_order,
    from_expert_order,
    grouped_swiglu,
    grouped_swiglu_reference,
    to_expert_order,
)


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through each of its chosen experts one at a time: slow, obviously right."""
    flat = x.reshape(-1, x.shape[-1])
    weights, indices = moe.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], indices[t]):
            gate, up = F.linear(flat[t], moe.experts.gate_up_proj[e]).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, moe.experts.down_proj[e])
    out = out + moe.shared_experts(flat)
    return out.view_as(x)


def make_moe() -> MoE:
    moe = MoE(preset("tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


def test_moe_matches_per_token_reference():
    moe = make_moe()
    x = torch.randn(3, 11, preset("tiny").hidden_size)
    torch.testing.assert_close(moe(x), per_token_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_moe_gradients_match_reference():
    moe = make_moe()
    x = torch.randn(2, 9, preset("tiny").hidden_size)
    moe(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    per_token_reference(moe, x).square().sum().backward()
    for name, p in moe.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_grouped_kernel_matches_segment_reference_including_empty_experts():
    experts, dim, hidden = 5, 16, 8
    gate_up = torch.randn(experts, 2 * hidden, dim, requires_grad=True)
    down = torch.randn(experts, dim, hidden, requires_grad=True)
    counts = torch.tensor([3, 0, 4, 0, 2])  # two experts get no tokens
    x = torch.randn(int(counts.sum()), dim, requires_grad=True)
    fast = grouped_swiglu(x, counts, gate_up, down)
    slow = grouped_swiglu_reference(x, counts.tolist(), gate_up, down)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    (g_fast,) = torch.autograd.grad(fast.sum(), gate_up)
    (g_slow,) = torch.autograd.grad(slow.sum(), gate_up)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5)
    assert g_fast[1].abs().sum() == 0  # an expert with no tokens gets no gradient


def test_grouped_kernel_scales_activations_like_the_reference():
    experts, dim, hidden = 4, 16, 8
    gate_up, down = torch.randn(experts, 2 * hidden, dim), torch.randn(experts, dim, hidden)
    counts = torch.tensor([2, 0, 5, 3])
    x = torch.randn(int(counts.sum()), dim)
    scale = torch.rand(x.shape[0], requires_grad=True)
    fast = grouped_swiglu(x, counts, gate_up, down, scale=scale)
    torch.testing.assert_close(fast, grouped_swiglu(x, counts, gate_up, down) * scale.unsqueeze(-1))
    torch.testing.assert_close(fast, grouped_swiglu_reference(x, counts.tolist(), gate_up, down, scale=scale))
    (g_fast,) = torch.autograd.grad(fast.square().sum(), scale)
    ref = grouped_swiglu_reference(x, counts.tolist(), gate_up, down, scale=scale)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), scale)
    torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize("limit", [0.0, 0.9])
@pytest.mark.parametrize("scaled", [False, True])
def test_scaled_swiglu_formula_gradients(limit, scaled):
    """The experts' activation, differentiated by formula (float64 gradcheck), with V4's clamp and without."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, dtype=torch.float64, generator=generator)
    if limit:  # keep clear of the clamp's kinks, where a numerical derivative is meaningless
        hidden = torch.where((hidden.abs() - limit).abs() < 0.05, hidden + 0.2, hidden)
    hidden.requires_grad_()
    scale = torch.rand(6, dtype=torch.float64, generator=generator, requires_grad=True) if scaled else None
    gate, up = hidden.chunk(2, dim=-1)
    expected = swiglu(gate, up, limit) * (scale.unsqueeze(-1) if scaled else 1)
    torch.testing.assert_close(_ScaledSwiGLU.apply(hidden, scale, limit), expected, rtol=0, atol=0)
    inputs = (hidden, scale) if scaled else (hidden,)
    assert torch.autograd.gradcheck(lambda h, *s: _ScaledSwiGLU.apply(h, s[0] if s else None, limit), inputs)


@pytest.mark.parametrize("regather", [False, True])
def test_grouped_experts_keep_few_activations(regather):
    """Autograd keeps, of the [M, moe_intermediate] activations, only the down projection's input; with rows_of, not
    the [M, hidden] gathered token rows either (gathered again in backward: they are freed after forward) and the
    gradients are unchanged."""
    experts, dim, hidden = 4, 12, 8  # [M, dim], [M, hidden] and [M, 2 hidden] all differ
    gate_up = torch.randn(experts, 2 * hidden, dim, requires_grad=True)
    down = torch.randn(experts, dim, hidden, requires_grad=True)
    counts = torch.tensor([3, 1, 4, 2])
    tokens = torch.randn(6, dim, requires_grad=True)
    index = torch.tensor([0, 2, 5, 1, 1, 3, 4, 0, 2, 5])  # sorted by expert, each token chosen by up to 2
    scale = torch.rand(index.shape[0], requires_grad=True)
    leaves = (tokens, gate_up, down, scale)
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    rows = tokens[index]
    alive = weakref.ref(rows.untyped_storage())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grouped_swiglu(rows, counts, gate_up, down, scale=scale, rows_of=(tokens, index) if regather else None)
    del rows
    assert (alive() is None) == regather  # nothing else (the saved-tensor hook's closure) keeps the rows until backward
    grads = torch.autograd.grad(out.square().sum(), leaves)
    expected = torch.autograd.grad(grouped_swiglu_reference(tokens[index], counts.tolist(), gate_up, down,
                                                            scale=scale).square().sum(), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert shapes.count((index.shape[0], hidden)) == 1, shapes
    assert shapes.count((index.shape[0], dim)) == (0 if regather else 1), shapes


def test_regathered_rows_refuse_tokens_changed_in_place():
    experts, dim, hidden = 2, 12, 8
    gate_up = torch.randn(experts, 2 * hidden, dim, requires_grad=True)
    down = torch.randn(experts, dim, hidden)
    tokens, index = torch.randn(3, dim), torch.tensor([0, 2, 1, 2])
    out = grouped_swiglu(tokens[index], torch.tensor([2, 2]), gate_up, down, rows_of=(tokens, index))
    tokens.mul_(2)  # the rows backward would gather are no longer the ones the forward used
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_expert_order_round_trip_equals_scatter_add_and_its_gradients():
    """to_expert_order / from_expert_order (row gathers both ways) against index_select + index_add_, in float64,
    with experts that get no tokens and tokens whose choices share an expert's group."""
    generator = torch.Generator().manual_seed(0)
    tokens, top_k, experts, dim = 7, 3, 6, 5
    indices = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    indices[indices == 4] = 5  # expert 4 gets nothing
    indices[0] = torch.tensor([5, 0, 1])
    order, inverse, counts = expert_order(indices, experts)
    assert counts.tolist() == torch.bincount(indices.flatten(), minlength=experts).tolist() and counts[4] == 0
    assert torch.equal(indices.flatten()[order], indices.flatten().sort(stable=True).values)
    assert torch.equal(order[inverse], torch.arange(tokens * top_k))
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    rows = to_expert_order(x, order, inverse, top_k)
    torch.testing.assert_close(rows, x[order // top_k])
    y = torch.randn(tokens * top_k, dim, dtype=torch.float64, requires_grad=True)
    summed = from_expert_order(y, order, inverse, top_k)
    torch.testing.assert_close(summed, torch.zeros(tokens, dim, dtype=torch.float64).index_add(0, order // top_k, y))
    assert torch.autograd.gradcheck(lambda t: to_expert_order(t, order, inverse, top_k), (x,))
    assert torch.autograd.gradcheck(lambda t: from_expert_order(t, order, inverse, top_k), (y,))
    assert torch.autograd.gradgradcheck(lambda t: from_expert_order(t, order, inverse, top_k), (y,))


def test_moe_in_bf16_autocast_stays_close_to_fp32():
    moe = make_moe()
    x = torch.randn(2, 8, preset("tiny").hidden_size)
    ref = moe(x)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        low = moe(x)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_checkpointed_experts_keep_their_rows_the_plain_way():
    """Inside activation checkpointing the experts' saved-tensor recipe is off (checkpointing's hooks must see
    everything the region saves); outside it stays on."""
    from polytrain.models import build_model
    from polytrain.models.common.moe import GroupedExperts
    from polytrain.parallel.checkpointing import apply_activation_checkpointing
    from polytrain.parallel.config import ParallelConfig

    def flags(**ac) -> list[bool]:
        model = build_model(preset("tiny"), "cpu", seed=0)
        apply_activation_checkpointing(model, ParallelConfig(**ac))
        return [m.regather_rows for m in model.modules() if isinstance(m, GroupedExperts)]

    assert all(flags(activation_checkpointing="none"))
    assert not any(flags(activation_checkpointing="full"))
    assert not any(flags(activation_checkpointing="selective", ac_every=0, ac_modules=["experts"]))
    assert all(flags(activation_checkpointing="selective", ac_every=0, ac_modules=["norm"]))
    assert flags(activation_checkpointing="selective", ac_every=2) == [True, False, True]  # blocks 1, 2, 3: 2 whole


def test_full_recomputation_leaves_nothing_alive_after_backward():
    """With the balance loss on, a router used to keep the loss of its recomputed forward, never differentiated,
    and with it every checkpointed block's recomputed tensors until the next step (V3-671B, 1,024 ranks, no
    pipeline: 89 GiB of a 135 GiB peak in `polytrain dryrun`). After backward only parameters and their gradients
    remain of what the step made."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from polytrain.models import build_model
    from polytrain.models.common.moe import Router
    from polytrain.parallel.checkpointing import apply_activation_checkpointing
    from polytrain.parallel.config import ParallelConfig

    model = build_model(preset("tiny-v3", aux_loss_alpha=1e-3), "cpu", seed=0)
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing="full"))
    made: dict[int, weakref.ref] = {}

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    made.setdefault(id(t.untyped_storage()), (weakref.ref(t.untyped_storage()), str(func), t.shape))
            return out

    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with Made():
        out = model.forward_train(ids)
        loss = out.hidden.float().square().mean() + out.aux_loss
        loss.backward()
    del out, loss
    gc.collect()
    kept = {id(t.untyped_storage()) for p in model.parameters() for t in (p, p.grad) if t is not None}
    kept |= {id(b.untyped_storage()) for b in model.buffers()}  # the routers' expert load, updated in place
    kept.add(id(ids.untyped_storage()))  # views of the input
    alive = [(op, shape) for key, (ref, op, shape) in made.items() if ref() is not None and key not in kept]
    assert not alive, alive
    assert all(m.aux_loss is None for m in model.modules() if isinstance(m, Router))
