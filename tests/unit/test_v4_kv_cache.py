"""DeepSeek-V4 decoding with its KV cache (window ring, compressor states, indexer entries) against recomputing
the whole sequence for every token."""

from __future__ import annotations

import pytest
import torch

from polytrain.models import model_config_from_table
from polytrain.models.deepseek_v4.kv_cache import ring_positions
from polytrain.models.registry import spec_for
from polytrain.rollout.generate import SamplingConfig, _sample_without_cache, alone, sample

PROMPTS = (5, 17, 1, 30)  # rows at different positions; 30 + 40 tokens cross many windows of 8 and entries of 4 / 8


@pytest.fixture(scope="module")
def model():
    config = model_config_from_table({"preset": "tiny-v4"})
    lm = spec_for(config).build(config, "cpu", seed=0)
    for p in lm.parameters():  # larger than the initial weights, so logits differ between tokens
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.15, generator=torch.Generator().manual_seed(p.numel()))
    return lm.eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in PROMPTS]


def test_cached_decode_logits_equal_full_recomputation(model):
    prompts, steps = _prompts(), 40
    g = torch.Generator().manual_seed(1)
    continuation = torch.randint(1, 128, (len(prompts), steps), generator=g)
    longest = max(PROMPTS)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    cache = model.new_cache(len(prompts), longest + steps)
    with torch.no_grad():
        cached = [model(ids, cache=cache, valid=valid)[:, -1]]
        for t in range(steps - 1):
            cached.append(model(continuation[:, t : t + 1], cache=cache)[:, -1])
        for i, p in enumerate(prompts):
            full = model(torch.cat([torch.tensor(p), continuation[i, : steps - 1]])[None])[0, len(p) - 1 :]
            torch.testing.assert_close(torch.stack([c[i] for c in cached]), full, atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [n + steps - 1 for n in PROMPTS]


def test_greedy_and_sampled_generation_match_the_uncached_sampler(model):
    prompts = _prompts()
    for cfg in (SamplingConfig(max_new_tokens=24), SamplingConfig(max_new_tokens=24, temperature=1.0, seed=3)):
        seeds = [11, 12, 13, 14]
        with_cache = sample(model, prompts, cfg, {7}, row_seeds=seeds)
        without = _sample_without_cache(model, prompts, cfg, {7}, 0, alone, seeds)
        assert with_cache == without
        assert max(len(t) for t in with_cache[0]) > 12


def test_a_cache_refuses_a_second_prefill_and_overflow(model):
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="prefilled once"):
            model(torch.tensor([[1, 2]]), cache=cache)
        for _ in range(5):
            model(torch.tensor([[4]]), cache=cache)
        with pytest.raises(ValueError, match="holds 8 positions"):
            model(torch.tensor([[4]]), cache=cache)


def test_ring_slots_hold_the_latest_position_of_their_residue():
    held = ring_positions(torch.tensor([0, 3, 10]), 4)
    assert held.tolist() == [[-4, -3, -2, -1], [0, 1, 2, -1], [8, 9, 6, 7]]
