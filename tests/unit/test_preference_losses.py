"""Preference losses against values computed by hand (math module, no torch in the expected values)."""

from __future__ import annotations

import math

import pytest
import torch

from polytrain.algorithms.preference import DPOConfig, bradley_terry_losses, dpo_losses

# one pair: summed log-probs under the policy (w = chosen, l = rejected), under the reference, lengths
LP_W, LP_L, REF_W, REF_L, LEN_W, LEN_L = -4.0, -9.0, -5.0, -8.0, 4, 6


def run(**cfg):
    t = lambda x: torch.tensor([float(x)])
    loss, margin = dpo_losses(DPOConfig(**cfg), t(LP_W), t(LP_L), t(REF_W), t(REF_L), t(LEN_W), t(LEN_L))
    return float(loss), float(margin)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


DELTA = (LP_W - REF_W) - (LP_L - REF_L)  # = 1 - (-1) = 2


def test_dpo_sigmoid():
    loss, margin = run(loss="sigmoid", beta=0.1)
    assert margin == pytest.approx(DELTA)
    assert loss == pytest.approx(-logsig(0.1 * DELTA))


def test_conservative_dpo_label_smoothing():
    loss, _ = run(loss="sigmoid", beta=0.5, label_smoothing=0.2)
    assert loss == pytest.approx(-0.8 * logsig(0.5 * DELTA) - 0.2 * logsig(-0.5 * DELTA))


def test_ipo_uses_length_averaged_log_ratios():
    loss, _ = run(loss="ipo", beta=0.25)
    averaged = (LP_W - REF_W) / LEN_W - (LP_L - REF_L) / LEN_L
    assert loss == pytest.approx((averaged - 1 / (2 * 0.25)) ** 2)


def test_simpo_is_reference_free_with_a_margin():
    loss, _ = run(loss="simpo", beta=2.0, simpo_gamma=0.5)
    assert loss == pytest.approx(-logsig(2.0 * (LP_W / LEN_W - LP_L / LEN_L) - 0.5))


def test_orpo_combines_nll_and_odds_ratio():
    loss, _ = run(loss="orpo", beta=0.1)
    a_w, a_l = LP_W / LEN_W, LP_L / LEN_L
    log_odds = (a_w - math.log(1 - math.exp(a_w))) - (a_l - math.log(1 - math.exp(a_l)))
    assert loss == pytest.approx(-a_w - 0.1 * logsig(log_odds))


def test_hinge():
    assert run(loss="hinge", beta=0.1)[0] == pytest.approx(max(0.0, 1 - 0.1 * DELTA))


def test_bradley_terry_with_and_without_margin():
    r_w, r_l = torch.tensor([1.5, -0.2]), torch.tensor([0.5, 0.3])
    assert bradley_terry_losses(r_w, r_l).tolist() == pytest.approx([-logsig(1.0), -logsig(-0.5)])
    assert bradley_terry_losses(r_w, r_l, torch.tensor([1.0, 0.0])).tolist() == pytest.approx(
        [-logsig(0.0), -logsig(-0.5)])


def test_identical_chosen_and_rejected_is_a_data_error(tmp_path):
    from polytrain.data.preference import parse_pair
    from polytrain.errors import DataError

    with pytest.raises(DataError, match="identical"):
        parse_pair({"prompt": "p", "chosen": "a", "rejected": "a"}, "f:1")
    with pytest.raises(DataError, match="needs `prompt`, `chosen` and `rejected`"):
        parse_pair({"prompt": "p", "chosen": "a"}, "f:2")
