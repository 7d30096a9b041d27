"""DeepSeek-V4 pieces: causality of the whole hybrid model, mHC mixing, hash routing, clamped SwiGLU."""

from __future__ import annotations

import torch

from polytrain.models import build_model, preset
from polytrain.models.common.layers import swiglu
from polytrain.models.common.moe import HashRouter
from polytrain.models.deepseek_v4.hyper_connections import HyperConnection


def test_v4_model_is_causal_across_sliding_compressed_and_sparse_layers():
    model = build_model(preset("tiny-v4"), "cpu", seed=0).eval()
    tokens = torch.randint(0, 128, (1, 48))
    changed = tokens.clone()
    changed[0, 30:] = torch.randint(0, 128, (18,))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_compressed_entries_matter_beyond_the_sliding_window():
    """A token far outside the 8-token window still changes a late query's output through compressed entries."""
    model = build_model(preset("tiny-v4"), "cpu", seed=0).eval()
    tokens = torch.randint(0, 128, (1, 48))
    changed = tokens.clone()
    changed[0, 2] = (tokens[0, 2] + 1) % 128
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[:, 40:], model(changed)[:, 40:])


def test_mixing_matrix_is_doubly_stochastic_and_collapse_is_weighted_sum():
    hc = HyperConnection(preset("tiny-v4"))
    torch.nn.init.normal_(hc.fn, std=0.1)
    streams = torch.randn(2, 5, 4, 64)
    post, comb, collapsed = hc(streams)
    # Sinkhorn ends on a column normalisation: columns exact, rows converged
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 5, 4), atol=1e-2, rtol=0)
    assert ((post > 0) & (post < 2)).all()
    assert collapsed.shape == (2, 5, 64)


def test_hash_router_takes_experts_from_the_table():
    config = preset("tiny-v4")
    router = HashRouter(config)
    torch.nn.init.normal_(router.weight)
    router.tid2eid.copy_(torch.tensor([[1, 5]] * config.vocab_size))
    router.tid2eid[7] = torch.tensor([0, 3])
    ids = torch.tensor([7, 9])
    weights, indices = router(torch.randn(2, config.hidden_size), ids)
    assert indices.tolist() == [[0, 3], [1, 5]]
    torch.testing.assert_close(weights.sum(-1), torch.full((2,), config.routed_scaling_factor))


def test_clamped_swiglu_limits_gate_above_and_up_both_sides():
    gate = torch.tensor([20.0, -20.0])
    up = torch.tensor([30.0, -30.0])
    out = swiglu(gate, up, limit=10.0)
    expected = torch.nn.functional.silu(torch.tensor([10.0, -20.0])) * torch.tensor([10.0, -10.0])
    torch.testing.assert_close(out, expected)
