"""GRPO-family and distillation losses against values computed by hand (math module) in the test."""

from __future__ import annotations

import math

import pytest
import torch

from polytrain.algorithms.distill import mean_teacher_logprobs, reverse_kl
from polytrain.algorithms.grpo import (
    PRESETS,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_table,
    kl_estimate,
    mismatch_correction,
)
from polytrain.errors import ConfigError


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):  # Bessel-corrected, as torch.std
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    flat = [r for g in REWARDS for r in g]
    got = group_advantages(torch.tensor(flat), 4, scale, 1e-6).tolist()
    expected = []
    for group in REWARDS:
        for r in group:
            centred = r - mean(group)
            if scale == "group":
                centred /= std(group) + 1e-6
            elif scale == "batch":
                centred /= std(flat) + 1e-6
            expected.append(centred)
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[4:8] == [0.0] * 4  # a group with equal rewards teaches nothing


def test_advantage_sign_follows_reward():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, "group", 1e-6)
    assert adv[0] > 0 and (adv[1:] < 0).all()


@pytest.mark.parametrize(("lp", "old", "adv", "clip_low", "clip_high", "dual", "loss", "clipped"), [
    # ratio 1.5 > 1 + 0.2 with A > 0: the clipped term 1.2 * A is the larger loss (-1.2 > -1.5)
    (math.log(1.5), 0.0, 1.0, 0.2, 0.2, 0.0, -1.2, 1.0),
    # clip-higher: 1 + 0.28 bound
    (math.log(1.5), 0.0, 1.0, 0.2, 0.28, 0.0, -1.28, 1.0),
    # ratio 0.5 with A > 0: unclipped -0.5 is larger than clipped -0.8: no clipping
    (math.log(0.5), 0.0, 1.0, 0.2, 0.2, 0.0, -0.5, 0.0),
    # ratio 0.5 with A < 0: max(0.5 * 2, 0.8 * 2) = 1.6, clipped
    (math.log(0.5), 0.0, -2.0, 0.2, 0.2, 0.0, 1.6, 1.0),
    # ratio 5 with A < 0: 5 * 1 = 5; dual clip caps it at 3 * 1
    (math.log(5.0), 0.0, -1.0, 0.2, 0.2, 3.0, 3.0, 0.0),
    (math.log(5.0), 0.0, -1.0, 0.2, 0.2, 0.0, 5.0, 0.0),
])
def test_clipped_surrogate(lp, old, adv, clip_low, clip_high, dual, loss, clipped):
    got, was_clipped = clipped_surrogate(torch.tensor([lp]), torch.tensor([old]), torch.tensor([adv]), clip_low,
                                         clip_high, dual)
    assert float(got) == pytest.approx(loss, rel=1e-6)
    assert float(was_clipped) == clipped


def test_surrogate_gradient_is_policy_gradient_at_ratio_one():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = clipped_surrogate(lp, lp.detach(), torch.tensor([0.5, -1.5]), 0.2, 0.2)
    loss.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-0.5, 1.5])  # minimising raises log-probs of A > 0


@pytest.mark.parametrize(("kind", "fn"), [
    ("k1", lambda d: d), ("k2", lambda d: d * d / 2), ("k3", lambda d: math.exp(-d) + d - 1),
])
def test_kl_estimators(kind, fn):
    lp, ref = [-1.0, -0.5, -3.0], [-1.5, -0.5, -1.0]
    got = kl_estimate(torch.tensor(lp), torch.tensor(ref), kind).tolist()
    assert got == pytest.approx([fn(a - b) for a, b in zip(lp, ref)], rel=1e-6)


# two completions of 3 and 1 tokens in a [2, 3] batch; per-token losses and the mask
PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize(("mode", "expected"), [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ("constant", (1 + 2 + 3 + 4) / (2 * 8)),
])
def test_aggregation_modes(mode, expected):
    got = aggregate(torch.tensor(PER_TOKEN), torch.tensor(MASK), mode, global_tokens=4, global_seqs=2,
                    max_new_tokens=8)
    assert float(got) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "constant"])
def test_aggregation_shares_add_up_to_the_global_value(mode):
    """Split the batch row by row (as micro-batches or ranks do): the shares sum to the whole batch's value."""
    per_token, mask = torch.tensor(PER_TOKEN), torch.tensor(MASK)
    whole = aggregate(per_token, mask, mode, 4, 2, 8)
    parts = sum(aggregate(per_token[i : i + 1], mask[i : i + 1], mode, 4, 2, 8) for i in range(2))
    assert float(parts) == pytest.approx(float(whole))


def test_presets_fill_only_unset_keys():
    table = grpo_table({"preset": "dapo", "clip_low": 0.1})
    assert table["clip_high"] == PRESETS["dapo"]["clip_high"] == 0.28
    assert table["clip_low"] == 0.1
    assert grpo_table({"preset": "dr_grpo"})["scale_rewards"] == "none"
    with pytest.raises(ConfigError, match="unknown grpo.preset `verll`.*verl"):
        grpo_table({"preset": "verll"})


def test_reverse_kl_full_vocabulary():
    ps, pt = [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]
    expected = sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps, pt))
    got = reverse_kl(torch.tensor(ps).log()[None], torch.tensor(pt).log()[None])
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(reverse_kl(torch.tensor(pt).log()[None], torch.tensor(pt).log()[None])) == pytest.approx(0, abs=1e-6)


def test_teacher_mean_is_the_normalised_geometric_mean():
    a, b = [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]
    geo = [math.sqrt(x * y) for x, y in zip(a, b)]
    expected = [math.log(g / sum(geo)) for g in geo]
    got = mean_teacher_logprobs([torch.tensor(a).log(), torch.tensor(b).log()])
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


# two completions of 3 token slots; the second has 2 completion tokens. old - engine per token:
MISMATCH_OLD = torch.tensor([[math.log(3.0), 0.0, math.log(0.5)], [math.log(1.5), math.log(4.0), 0.0]])
MISMATCH_ENGINE = torch.zeros(2, 3)
MISMATCH_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_tis_truncates_each_tokens_ratio_at_the_cap():
    weight, metrics = mismatch_correction(MISMATCH_OLD, MISMATCH_ENGINE, MISMATCH_MASK, "token-tis", 2.0, 0.5, 2.0)
    # ratios 3, 1, 0.5 | 1.5, 4, (outside the mask: log-ratio zeroed) 1
    assert torch.allclose(weight, torch.tensor([[2.0, 1.0, 0.5], [1.5, 2.0, 1.0]]))
    assert float(metrics["capped_tokens"]) == 2.0
    # k3 per token: r - 1 - log r
    k3 = sum(r - 1 - math.log(r) for r in (3.0, 1.0, 0.5, 1.5, 4.0))
    assert math.isclose(float(metrics["mismatch_k3"]), k3, rel_tol=1e-6)


def test_sequence_mask_drops_completions_by_their_geometric_mean_ratio():
    weight, metrics = mismatch_correction(MISMATCH_OLD, MISMATCH_ENGINE, MISMATCH_MASK, "sequence-mask", 2.0, 0.5,
                                          2.0)
    # geometric means: (3 x 1 x 0.5)^(1/3) = 1.145 (kept); (1.5 x 4)^(1/2) = 2.449 (dropped)
    assert torch.equal(weight, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert float(metrics["masked_sequences"]) == 1.0
    none, _ = mismatch_correction(MISMATCH_OLD, MISMATCH_ENGINE, MISMATCH_MASK, "none", 2.0, 0.5, 2.0)
    assert torch.equal(none, torch.ones(2, 3))
