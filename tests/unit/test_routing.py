"""Router: group-limited top-k, the correction bias only steers the choice, weight normalisation, bias update."""

from __future__ import annotations

import torch

from polytrain.models import build_model, preset
from polytrain.models.common.moe import Router, route, update_router_biases


def brute_force_route(scores, bias, top_k, n_group, topk_group):
    """Reference: try every allowed set of groups, keep the best experts of the best groups."""
    num_experts = scores.shape[1]
    per_group = num_experts // n_group
    chosen = []
    for row, brow in zip(scores, bias):
        biased = row + brow
        group_score = [sorted(biased[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
        group_score = [sum(v) for v in group_score]
        best_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(num_experts) if e // per_group in best_groups]
        chosen.append(sorted(sorted(allowed, key=lambda e: -biased[e])[:top_k]))
    return chosen


def test_group_limited_topk_matches_brute_force():
    scores = torch.rand(64, 16)
    bias = torch.randn(16) * 0.1
    _, indices = route(scores, bias, top_k=3, n_group=4, topk_group=2, norm_topk_prob=True, scaling_factor=1.0)
    expected = brute_force_route(scores, bias.expand(64, -1), 3, 4, 2)
    assert [sorted(r) for r in indices.tolist()] == expected


def test_experts_come_only_from_the_allowed_number_of_groups():
    scores = torch.rand(256, 32)
    _, indices = route(scores, None, top_k=4, n_group=8, topk_group=2, norm_topk_prob=True, scaling_factor=1.0)
    groups_used = (indices // 4).tolist()
    assert max(len(set(g)) for g in groups_used) <= 2


def test_group_limit_changes_the_choice_compared_with_plain_topk():
    # Expert 0 scores highest but its group's second-best is poor; group-limited routing must skip group 0.
    scores = torch.tensor([[0.99, 0.0, 0.9, 0.9, 0.8, 0.8, 0.1, 0.1]])
    _, limited = route(scores, None, top_k=2, n_group=4, topk_group=1, norm_topk_prob=True, scaling_factor=1.0)
    _, plain = route(scores, None, top_k=2, n_group=1, topk_group=1, norm_topk_prob=True, scaling_factor=1.0)
    assert sorted(limited[0].tolist()) == [2, 3]
    assert sorted(plain[0].tolist()) == [0, 2] or sorted(plain[0].tolist()) == [0, 3]


def test_bias_changes_selection_but_not_weights():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # pushes expert 2 into the top-2
    weights, indices = route(scores, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=False, scaling_factor=1.0)
    assert sorted(indices[0].tolist()) == [0, 2]
    # the weights are the *unbiased* scores of the chosen experts
    by_expert = dict(zip(indices[0].tolist(), weights[0].tolist()))
    assert abs(by_expert[2] - 0.1) < 1e-6 and abs(by_expert[0] - 0.9) < 1e-6


def test_weights_normalised_then_scaled():
    scores = torch.rand(32, 8)
    weights, _ = route(scores, None, top_k=3, n_group=1, topk_group=1, norm_topk_prob=True, scaling_factor=2.5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((32,), 2.5))
    raw, _ = route(scores, None, top_k=3, n_group=1, topk_group=1, norm_topk_prob=False, scaling_factor=1.0)
    assert not torch.allclose(raw.sum(dim=-1), torch.ones(32))


def test_router_counts_load_only_in_training_and_bias_moves_towards_balance():
    config = preset("tiny")
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(100, config.hidden_size)
    router.eval()
    router(x)
    assert router.expert_load.sum() == 0
    router.train()
    router(x)
    assert router.expert_load.sum() == 100 * config.num_experts_per_tok
    load = router.expert_load.clone()
    holder = torch.nn.ModuleList([router])
    update_router_biases(holder, rate=0.01)
    bias = router.e_score_correction_bias
    mean = load.mean()
    for e in range(config.n_routed_experts):
        if load[e] > mean:
            assert bias[e] < 0
        elif load[e] < mean:
            assert bias[e] > 0
    assert router.expert_load.sum() == 0  # counts cleared after the update


def test_bias_update_reaches_every_moe_layer_of_the_model():
    model = build_model(preset("tiny"), "cpu")
    model(torch.randint(0, 100, (2, 16)))
    stats = update_router_biases(model, rate=0.001)
    assert stats["layers"] == preset("tiny").num_moe_layers
    assert stats["load_ratio_sum"] / stats["layers"] >= 1.0
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == preset("tiny").num_moe_layers
    assert all(r.e_score_correction_bias.abs().sum() > 0 for r in routers)

