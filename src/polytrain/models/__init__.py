"""Model families as plain PyTorch modules, each described by one ModelSpec (see models/registry.py)."""

from polytrain.models.common.config import ModelConfig
from polytrain.models.common.decoder import DecoderLM, TrainOutput
from polytrain.models.registry import PRESETS, build_model, model_config_from_table, preset, spec_for

__all__ = ["PRESETS", "DecoderLM", "ModelConfig", "TrainOutput", "build_model", "model_config_from_table", "preset",
           "spec_for"]
