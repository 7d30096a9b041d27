"""benchmarks/gemm_shapes.py: its ceiling accounts for every FLOP of the benchmark model exactly once."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
gemm_shapes = importlib.import_module("gemm_shapes")


@pytest.mark.parametrize("width", [512, 768])
def test_ceiling_is_the_peak_when_every_part_runs_at_the_peak(width):
    from vs_transformers import WIDTHS

    from polytrain.models import preset
    from polytrain.plan.flops import flops_per_token

    model = WIDTHS[width]
    peak = 300e9
    flops = flops_per_token(preset("tiny", **model), 2048)
    names = ("head_logits", "head_grad_hidden", "head_grad_weight", "experts_forward_backward", "dense_projection")
    result = {"matmul_peak_flops": peak, "rates_flops": dict.fromkeys(names, peak)}
    attention_s = flops.attention_core * 2048 / peak
    ceiling = gemm_shapes.ceiling(result, attention_s=attention_s, optimizer_s=0.0, model=model)
    assert ceiling["ceiling_mfu"] == pytest.approx(1.0, rel=1e-9)
    # half-speed experts: exactly their share of the step is added
    slow = {**result, "rates_flops": {**result["rates_flops"], "experts_forward_backward": peak / 2}}
    experts_s = (flops.moe_routed + flops.moe_shared) * 2048 / peak
    assert gemm_shapes.ceiling(slow, attention_s, 0.0, model)["step_s"] == pytest.approx(ceiling["step_s"] + experts_s)
