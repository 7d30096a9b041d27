"""DeepSeekV3Config: the DeepSeek-V3 family's fields (multi-head latent attention), and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polytrain.models.common.config import ModelConfig
from polytrain.schema import option

ARCHITECTURE = "deepseek_v3"


@dataclass
class DeepSeekV3Config(ModelConfig):
    architecture: str = option(ARCHITECTURE, "Model family: deepseek_v3 = MLA attention, dense first layers, plain "
                               "residuals.")
    kv_lora_rank: int = option(512, "MLA: width of the compressed key/value latent.", ge=1)
    qk_nope_head_dim: int = option(128, "MLA: per-head query/key width without rotary position embedding.", ge=1)
    v_head_dim: int = option(128, "MLA: per-head value width.", ge=1)
    rope_interleave: bool = option(
        True, "RoPE rotates interleaved pairs (x0,x1),(x2,x3)... as DeepSeek's checkpoints expect; false: halves."
    )
    attention_bias: bool = option(False, "Bias on the q_a / kv_a / output projections.")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


PRESETS: dict[str, dict[str, Any]] = {
    # The demo model: small enough to train on a CPU; keeps every architectural feature of the V3 family.
    "tiny": dict(
        preset="tiny",
        vocab_size=128,
        hidden_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=384,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=1024,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=96,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    ),
    # `tiny` plus every other DeepSeek-V3 feature: MTP, YaRN with the attention-scale correction, balance loss.
    "tiny-v3": dict(
        preset="tiny-v3",
        vocab_size=128,
        hidden_size=128,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=384,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
        rope_scaling="yarn",
        yarn_factor=8.0,
        yarn_original_max_position_embeddings=256,
        yarn_mscale=1.0,
        yarn_mscale_all_dim=1.0,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=96,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        aux_loss_alpha=1e-4,
        num_nextn_predict_layers=1,
    ),
    # deepseek-ai/DeepSeek-V3 config.json (671B total, 37B activated, + 1 MTP module).
    "deepseek-v3-671b": dict(
        preset="deepseek-v3-671b",
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=163840,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        moe_intermediate_size=2048,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        rope_scaling="yarn",
        yarn_factor=40.0,
        yarn_original_max_position_embeddings=4096,
        yarn_beta_fast=32.0,
        yarn_beta_slow=1.0,
        yarn_mscale=1.0,
        yarn_mscale_all_dim=1.0,
        aux_loss_alpha=1e-4,
        num_nextn_predict_layers=1,
    ),
}
