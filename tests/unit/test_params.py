"""Parameter counts on the meta device agree with the published sizes of the released models."""

from __future__ import annotations

import pytest

from polytrain.models import preset
from polytrain.models.params import PUBLISHED, count_parameters


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v4-flash", "deepseek-v4-pro"])
def test_total_parameters_within_two_percent_of_published(name):
    total, _, _ = PUBLISHED[name]
    assert abs(count_parameters(preset(name)).main_total / total - 1) <= 0.02


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v4-pro"])
def test_activated_parameters_within_two_percent_of_published(name):
    _, active, _ = PUBLISHED[name]
    assert abs(count_parameters(preset(name)).main_active / active - 1) <= 0.02


def test_v3_mtp_module_is_counted_apart_and_matches_its_published_size():
    counts = count_parameters(preset("deepseek-v3-671b"))
    assert abs(counts.mtp_total / 11.5e9 - 1) <= 0.02  # README_WEIGHTS.md: 11.5B unique MTP parameters


def test_routed_experts_dominate_and_activation_uses_top_k_share():
    config = preset("deepseek-v3-671b")
    counts = count_parameters(config)
    assert counts.active["routed_experts"] == round(counts.total["routed_experts"] * 8 / 256)
