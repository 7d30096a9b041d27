"""MLA: shapes, causality, document masking for packed rows, KV-cache decoding equals the full forward."""

from __future__ import annotations

import torch

from polytrain.models import build_model, preset
from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v3.attention import MLA
from polytrain.models.deepseek_v3.model import attention_mask


def make_mla(**overrides) -> tuple[MLA, RotaryEmbedding]:
    config = preset("tiny", **overrides)
    mla = MLA(config, layer_idx=0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.ndim > 1 else None
    return mla, RotaryEmbedding(config)


def run(mla, rope, x, mask=None):
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    return mla(x, rope(positions), mask)


def test_mla_projection_shapes():
    config = preset("tiny")
    mla, _ = make_mla()
    heads = config.num_attention_heads
    assert mla.q_b_proj.weight.shape == (heads * config.qk_head_dim, config.q_lora_rank)
    assert mla.kv_a_proj_with_mqa.weight.shape == (config.kv_lora_rank + config.qk_rope_head_dim, config.hidden_size)
    assert mla.kv_b_proj.weight.shape == (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
    assert mla.o_proj.weight.shape == (config.hidden_size, heads * config.v_head_dim)


def test_mla_output_shape_with_and_without_q_lora():
    for q_lora_rank in (64, 0):
        mla, rope = make_mla(q_lora_rank=q_lora_rank)
        x = torch.randn(2, 7, preset("tiny").hidden_size)
        assert run(mla, rope, x).shape == x.shape
        assert hasattr(mla, "q_proj") == (q_lora_rank == 0)


def test_mla_is_causal():
    mla, rope = make_mla()
    x = torch.randn(1, 10, preset("tiny").hidden_size)
    changed = x.clone()
    changed[:, 6:] = torch.randn_like(changed[:, 6:])
    a, b = run(mla, rope, x), run(mla, rope, changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_explicit_causal_mask_equals_is_causal_path():
    mla, rope = make_mla()
    x = torch.randn(2, 9, preset("tiny").hidden_size)
    mask = attention_mask(torch.zeros(2, 9, dtype=torch.long), None, 0, 9)
    torch.testing.assert_close(run(mla, rope, x, mask), run(mla, rope, x))


def test_document_mask_blocks_attention_across_documents():
    mask = attention_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]), None, 0, 6)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_rotary_depends_only_on_relative_position():
    """q.k after RoPE is unchanged when both positions shift by the same amount."""
    config = preset("tiny")
    rope = RotaryEmbedding(config)
    from polytrain.models.common.rope import apply_rotary

    q = torch.randn(1, 1, 1, config.qk_rope_head_dim)
    k = torch.randn(1, 1, 1, config.qk_rope_head_dim)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_kv_cache_decoding_matches_full_forward():
    model = build_model(preset("tiny"), "cpu", seed=3)
    model.eval()
    tokens = torch.randint(0, 100, (2, 12))
    full = model(tokens)
    cache = model.new_cache(2, 16)
    pieces = [model(tokens[:, :5], cache=cache)]
    for t in range(5, 12):
        pieces.append(model(tokens[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_prompt():
    model = build_model(preset("tiny"), "cpu", seed=3)
    model.eval()
    prompt = torch.randint(0, 100, (1, 6))
    alone = model(prompt)[:, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache(1, 12)
    together = model(padded, position_ids=positions, cache=cache, valid=valid)[:, -1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_absorbed_decode_equals_expanded_decode_with_left_padding(monkeypatch):
    """Decode steps attend in latent space (kv_b_proj never runs on the cache) and give the expanded path's logits,
    padding masks included."""
    model = build_model(preset("tiny"), "cpu", seed=5)
    model.eval()
    prompts = torch.randint(1, 100, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    steps = torch.randint(1, 100, (2, 4))
    expansions = []
    hook = model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: expansions.append(i[0].shape))

    def decode() -> torch.Tensor:
        cache = model.new_cache(2, 12)
        out = [model(prompts, position_ids=positions, cache=cache, valid=valid)[:, -1]]
        for t in range(steps.shape[1]):
            pos = positions[:, -1:] + t + 1
            out.append(model(steps[:, t : t + 1], position_ids=pos, cache=cache)[:, -1])
        return torch.stack(out, dim=1)

    with torch.no_grad():
        absorbed = decode()
        assert len(expansions) == 1  # the prefill only
        monkeypatch.setattr(MLA, "absorb_for_decode", False)
        expanded = decode()
        assert len(expansions) == 1 + 1 + steps.shape[1]
    hook.remove()
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)
