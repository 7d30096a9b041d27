"""DeepSeek-family models as plain PyTorch modules."""

from polytrain.models.config import PRESETS, ModelConfig, model_config_from_table, preset
from polytrain.models.transformer import CausalLM, build_model

__all__ = ["PRESETS", "CausalLM", "ModelConfig", "build_model", "model_config_from_table", "preset"]
