"""The DeepSeek-V3 family (DeepSeek-V3 / R1 671B and the tiny presets): multi-head latent attention, dense first
layers, DeepSeekMoE with group-limited routing, multi-token prediction."""

from typing import Any

from torch import nn

from polytrain.models.common.spec import ModelSpec
from polytrain.models.deepseek_v3.config import ARCHITECTURE, PRESETS, DeepSeekV3Config
from polytrain.models.deepseek_v3.hf import V3Format
from polytrain.models.deepseek_v3.model import DeepSeekV3LM
from polytrain.models.deepseek_v3.planner import V3Planner


def tensor_parallel_plan(model: DeepSeekV3LM, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    """See models/deepseek_v3/tp.py (imported on use: DTensor's parallel styles load slowly)."""
    from polytrain.models.deepseek_v3.tp import tensor_parallel_plan as plan

    return plan(model, sequence_parallel)


SPEC = ModelSpec(
    architecture=ARCHITECTURE,
    description="MLA attention, dense first layers, plain residuals (DeepSeek-V3, R1)",
    config_class=DeepSeekV3Config,
    model_class=DeepSeekV3LM,
    presets=PRESETS,
    hf=V3Format(),
    planner=V3Planner(),
    tensor_parallel=tensor_parallel_plan,
    context_parallel=True,
)

__all__ = ["SPEC", "DeepSeekV3Config", "DeepSeekV3LM"]
