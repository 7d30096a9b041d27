"""Training FLOPs per token: the published DeepSeek-V3 figures, and an exact count of the CPU model's matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytrain.models import preset
from polytrain.models.deepseek_v3.attention import MLA
from polytrain.models.params import count_parameters
from polytrain.models.registry import build_model
from polytrain.plan.flops import flops_per_token


def test_deepseek_v3_matches_published_250_gflops_per_token_at_4k():
    # DeepSeek / Megatron-Bridge logs: 249.7-250 GF/token at seq 4096 without MTP; 260.0-260.6 with one MTP module.
    # 0.5% tolerance: our count adds the router (0.64 GF) that Megatron's formula leaves out.
    config = preset("deepseek-v3-671b")
    assert flops_per_token(config, 4096, mtp=False).total == pytest.approx(249.8e9, rel=0.005)
    assert flops_per_token(config, 4096).total == pytest.approx(260.3e9, rel=0.005)


def test_deepseek_v3_linear_part_is_six_times_activated_parameters():
    # 6 x (activated non-embedding parameters): the classic 6N estimate (DeepSeek: 6 x 37B = 222 GF) covers exactly
    # the weight matmuls; attention scores come on top (30.7 GF at 4K, x 8 at 32K).
    config = preset("deepseek-v3-671b")
    counts = count_parameters(config)
    non_embedding = counts.main_active - counts.active["embedding"] - counts.active["norms"]
    flops = flops_per_token(config, 4096, mtp=False)
    assert flops.linear == pytest.approx(6 * non_embedding, rel=1e-3)
    assert flops.attention_core == pytest.approx(30.7e9, rel=0.005)
    assert flops_per_token(config, 32768, mtp=False).attention_core == pytest.approx(8 * flops.attention_core)


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_v4_linear_part_tracks_its_activated_parameters(name):
    # V4 runs the mHC mixing matrix over 4 streams and the MTP h_proj over each stream: small extras over 6N.
    config = preset(name)
    counts = count_parameters(config)
    non_embedding = counts.main_active - counts.active["embedding"] - counts.active["norms"]
    flops = flops_per_token(config, 4096, mtp=False)
    assert flops.linear == pytest.approx(6 * non_embedding, rel=0.01)
    # compressed / windowed attention grows far slower with context than V3's full attention
    assert flops_per_token(config, 32768, mtp=False).attention_core < 3 * flops.attention_core


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs):
    return 2 * a[0] * a[1] * b[-1]  # tokens x in x out, summed over the expert segments


@pytest.mark.parametrize("name, seq", [("tiny", 64), ("tiny-v3", 64), ("tiny-v4", 64), ("tiny-v4", 300)])
def test_counts_every_matmul_of_the_cpu_model(name, seq, monkeypatch):
    """torch's FLOP counter on a forward of the real model, x 3, equals our count of what polytrain's attention
    code multiplies (`attention="dense"`): every matrix product is accounted for, none invented (the two agree
    exactly). At 300 tokens V4's block attention runs three query blocks. MLA's value padding for the fused
    attention kernel is off: the counter has no formula for the CPU flash kernel, and model FLOPs do not include
    the padding."""
    monkeypatch.setattr(MLA, "pad_values", False)
    config = preset(name)
    model = build_model(config, "cpu")
    batch = 2
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter, torch.no_grad():
        model(tokens)  # main model and its output head; MTP modules run only in forward_train
    measured = 3 * counter.get_total_flops() / (batch * seq)
    assert measured == pytest.approx(flops_per_token(config, seq, mtp=False, attention="dense").total, rel=1e-6)
    with counter, torch.no_grad():
        model.forward_train(tokens)  # + MTP modules, without any output head (the loss applies it)
    ours = flops_per_token(config, seq, attention="dense")
    heads = ours.vocab_head * (1 + config.num_nextn_predict_layers)
    assert 3 * counter.get_total_flops() / (batch * seq) == pytest.approx(ours.total - heads, rel=1e-6)


def test_causal_attention_averages_keys_over_positions():
    config = preset("deepseek-v4-pro")
    short = flops_per_token(config, 256, mtp=False)
    dense = flops_per_token(config, 256, mtp=False, attention="dense")
    assert short.attention_core < dense.attention_core
    assert short.linear == dense.linear
