"""DeepSeek-V4's block attention against its dense definition (attention_reference.py): same outputs, input
gradients and parameter gradients, same indexer choice, for every kind of layer and both ways CSA scores."""

from __future__ import annotations

import pytest
import torch

import polytrain.models.deepseek_v4.attention as attention_module
import polytrain.models.deepseek_v4.blockwise as blockwise
from polytrain.models import model_config_from_table
from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v4.attention import HybridAttention
from polytrain.models.deepseek_v4.attention_reference import dense_hybrid_attention, dense_index_choice

SEQ = 70  # five query blocks of 16, the last one partial; not a multiple of either compression ratio


def _layer(kind: str, topk: int, window: int = 12) -> tuple[HybridAttention, dict[str, RotaryEmbedding]]:
    config = model_config_from_table({"preset": "tiny-v4", "sliding_window": window, "index_topk": topk})
    layer = {"sliding": 0, "csa": 1, "hca": 2}[kind]
    torch.manual_seed(0)
    attn = HybridAttention(config, layer)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    attn.query_block = 16
    ropes = {"main": RotaryEmbedding(config, theta=config.rope_theta, scaled=False),
             "compress": RotaryEmbedding(config, theta=config.compress_rope_theta, scaled=True)}
    return attn, ropes


def _run(attn, ropes, forward) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(2, SEQ, attn.q_a_proj.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    tables = {name: rope(position_ids) for name, rope in ropes.items()}
    attn.zero_grad(set_to_none=True)
    out = forward(x, ropes, tables, position_ids)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("kind, topk, gather_above", [
    ("sliding", 3, 2), ("hca", 3, 2),
    ("csa", 3, 2),  # 17 entries > 2 x 3: each query's top 3 gathered
    ("csa", 12, 2),  # 17 entries <= 2 x 12: all scored, the chosen kept by a mask
    ("csa", 40, 0),  # more top-k than entries, gathered: the -1 slots are masked
])
def test_block_attention_matches_the_dense_definition(kind, topk, gather_above, monkeypatch):
    monkeypatch.setattr(blockwise, "GATHER_ABOVE", gather_above)
    attn, ropes = _layer(kind, topk)
    dense = _run(attn, ropes, lambda *a: dense_hybrid_attention(attn, *a))
    block = _run(attn, ropes, attn)
    torch.testing.assert_close(block[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block[1], dense[1], atol=1e-5, rtol=1e-5)
    assert block[2].keys() == dense[2].keys() and block[2]
    for name in dense[2]:
        torch.testing.assert_close(block[2][name], dense[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_indexer_chooses_block_by_block_what_it_chooses_at_once(monkeypatch):
    monkeypatch.setattr(attention_module, "INDEX_SCORE_ELEMENTS", 2 * 2 * 17 * 5)  # blocks of 5 queries
    attn, ropes = _layer("csa", 3)
    x = torch.randn(2, SEQ, attn.q_a_proj.in_features, generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    q_latent = attn.q_a_norm(attn.q_a_proj(x))
    chosen = attn.indexer(x, q_latent, position_ids, ropes["compress"])
    expected = dense_index_choice(attn.indexer, x, q_latent, position_ids, ropes["compress"])
    assert chosen.shape == (2, SEQ, 3) and (chosen >= 0).any() and (chosen < 0).any()
    assert torch.equal(chosen.sort(-1).values, expected.sort(-1).values)


def test_block_attention_keeps_only_its_inputs_for_backward():
    """Autograd keeps no [queries, keys] scores (a block's would end in 16 + 40 - 1 window keys, more than the 32
    channels of a head): every block is recomputed in backward."""
    attn, ropes = _layer("csa", 3, window=40)
    x = torch.randn(1, SEQ, attn.q_a_proj.in_features, requires_grad=True)
    position_ids = torch.arange(SEQ).unsqueeze(0)
    tables = {name: rope(position_ids) for name, rope in ropes.items()}
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        attn(x, ropes, tables, position_ids)
    assert shapes and all(len(s) < 4 or s[-1] <= attn.head_dim for s in shapes), shapes  # [B, H, Q, keys]
