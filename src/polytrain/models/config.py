"""ModelConfig: the architecture of a DeepSeek-style MoE causal LM, and named presets.

Field names follow the Hugging Face `config.json` of the released DeepSeek models, so a released config maps onto
this class key for key. A preset is just a dict of field values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from polytrain.errors import ConfigError, closest
from polytrain.schema import from_dict, option


@dataclass
class ModelConfig:
    preset: str = option("custom", "Name of the preset these values started from (informational).")
    vocab_size: int = option(129280, "Vocabulary size (rows of the embedding and the output head).", ge=1)
    hidden_size: int = option(7168, "Width of the residual stream.", ge=1)
    num_hidden_layers: int = option(61, "Number of decoder layers.", ge=1)
    first_k_dense_replace: int = option(3, "The first k layers use a dense SwiGLU MLP; the rest are MoE.", ge=0)
    intermediate_size: int = option(18432, "Hidden width of the dense SwiGLU MLP.", ge=1)

    # Multi-head latent attention (MLA)
    num_attention_heads: int = option(128, "Attention heads.", ge=1)
    q_lora_rank: int = option(1536, "Rank of the low-rank query projection; 0 projects queries directly.", ge=0)
    kv_lora_rank: int = option(512, "Width of the compressed key/value latent.", ge=1)
    qk_nope_head_dim: int = option(128, "Per-head query/key width without rotary position embedding.", ge=1)
    qk_rope_head_dim: int = option(64, "Per-head query/key width that carries the decoupled RoPE part.", ge=2)
    v_head_dim: int = option(128, "Per-head value width.", ge=1)
    rope_theta: float = option(10000.0, "RoPE base frequency.", gt=0)
    max_position_embeddings: int = option(4096, "Longest sequence the model is used with.", ge=1)
    attention_bias: bool = option(False, "Bias on the q_a / kv_a / output projections.")

    # DeepSeekMoE
    n_routed_experts: int = option(256, "Routed experts per MoE layer.", ge=1)
    num_experts_per_tok: int = option(8, "Routed experts chosen per token (top-k).", ge=1)
    n_shared_experts: int = option(1, "Shared experts (always active) per MoE layer.", ge=0)
    moe_intermediate_size: int = option(2048, "Hidden width of one expert.", ge=1)
    n_group: int = option(8, "Expert groups for group-limited routing (1 disables the group limit).", ge=1)
    topk_group: int = option(4, "Groups a token may route to (ranked by the sum of each group's top-2 scores).", ge=1)
    scoring_func: Literal["sigmoid", "softmax"] = option("sigmoid", "Router affinity function.")
    norm_topk_prob: bool = option(True, "Renormalise the chosen experts' weights to sum to 1.")
    routed_scaling_factor: float = option(2.5, "Multiplier on the routed experts' weights.", gt=0)

    rms_norm_eps: float = option(1e-6, "Epsilon of every RMSNorm.", gt=0)
    tie_word_embeddings: bool = option(False, "Share the embedding matrix with the output head.")
    initializer_range: float = option(0.02, "Std of the normal initialisation of weights.", gt=0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def validate(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"`model.n_routed_experts` ({self.n_routed_experts}) must be divisible by "
                f"`model.n_group` ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"`model.topk_group` ({self.topk_group}) must be <= `model.n_group` ({self.n_group})")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise ConfigError(
                f"`model.num_experts_per_tok` ({self.num_experts_per_tok}) exceeds the {reachable} experts in the "
                f"`topk_group`={self.topk_group} groups a token may use"
            )
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("group-limited routing ranks groups by their top-2 scores: use >= 2 experts per group")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"`model.qk_rope_head_dim` must be even, got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"`model.first_k_dense_replace` ({self.first_k_dense_replace}) exceeds "
                f"`model.num_hidden_layers` ({self.num_hidden_layers})"
            )


PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a 2-core CPU in about a minute; keeps every architectural feature of the V3 family.
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
    # deepseek-ai/DeepSeek-V3 config.json (671B total, 37B activated); MTP and YaRN arrive with the models issue.
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
    ),
}


def model_config_from_table(table: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """A ModelConfig from a `[model]` table: `preset` gives the starting values, other keys override them."""
    table = dict(table)
    preset = table.get("preset", "tiny")
    if preset not in PRESETS and preset != "custom":
        raise ConfigError(
            f"unknown model preset `{preset}`{closest(preset, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    values = {**PRESETS.get(preset, {}), **table}
    return from_dict(ModelConfig, values, prefix)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with field overrides (for tests and scripts)."""
    return model_config_from_table({"preset": name, **overrides})
