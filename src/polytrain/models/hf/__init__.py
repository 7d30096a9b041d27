"""Hugging Face interop: config.json <-> ModelConfig, tensor names both ways, FP8 / FP4 dequantisation, sharded
safetensors reading (lazily, tensor by tensor), export and streaming conversion."""

from polytrain.models.hf.checkpoint import HFCheckpoint, convert_checkpoint, load_hf_weights, save_hf
from polytrain.models.hf.config import hf_config_from_model, model_config_from_hf

__all__ = [
    "HFCheckpoint",
    "convert_checkpoint",
    "hf_config_from_model",
    "load_hf_weights",
    "model_config_from_hf",
    "save_hf",
]
