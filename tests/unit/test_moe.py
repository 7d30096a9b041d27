"""MoE experts: the grouped (sorted-token) computation equals a per-token dense reference, forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polytrain.models import preset
from polytrain.models.moe import MoE, grouped_swiglu, grouped_swiglu_reference


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


def test_moe_in_bf16_autocast_stays_close_to_fp32():
    moe = make_moe()
    x = torch.randn(2, 8, preset("tiny").hidden_size)
    ref = moe(x)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        low = moe(x)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
