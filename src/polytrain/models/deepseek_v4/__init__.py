"""The DeepSeek-V4 family (V4-Flash 284B, V4-Pro 1.6T and the tiny preset): hybrid compressed attention (CSA / HCA
+ sliding window), hash-routed first layers, manifold-constrained hyper-connections, multi-token prediction."""

from typing import Any

from torch import nn

from polytrain.models.common.spec import ModelSpec
from polytrain.models.deepseek_v4.config import ARCHITECTURE, PRESETS, DeepSeekV4Config
from polytrain.models.deepseek_v4.hf import V4Format
from polytrain.models.deepseek_v4.model import DeepSeekV4LM
from polytrain.models.deepseek_v4.planner import V4Planner


def tensor_parallel_plan(model: DeepSeekV4LM, sequence_parallel: bool) -> list[tuple[nn.Module, Any]]:
    """See models/deepseek_v4/tp.py (imported on use: DTensor's parallel styles load slowly)."""
    from polytrain.models.deepseek_v4.tp import tensor_parallel_plan as plan

    return plan(model, sequence_parallel)


SPEC = ModelSpec(
    architecture=ARCHITECTURE,
    description="hybrid compressed attention (CSA / HCA + sliding window), hash routing, hyper-connections "
    "(DeepSeek-V4)",
    config_class=DeepSeekV4Config,
    model_class=DeepSeekV4LM,
    presets=PRESETS,
    hf=V4Format(),
    planner=V4Planner(),
    tensor_parallel=tensor_parallel_plan,
    context_parallel=True,
)

__all__ = ["SPEC", "DeepSeekV4Config", "DeepSeekV4LM"]
