"""ModelConfig: what every model family shares (vocabulary, depth, width, rotary embedding, DeepSeekMoE, MTP).

A family subclasses it with the fields only its modules read (`models/<family>/config.py`); code outside the family
folders sees only the fields declared here. Field names follow the Hugging Face `config.json` of the released
models, so a released config maps onto a family's class key for key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from polytrain.errors import ConfigError
from polytrain.schema import option


@dataclass
class ModelConfig:
    preset: str = option("custom", "Name of the preset these values started from (informational).")
    architecture: str = option(
        "", "Model family, by its Hugging Face `model_type` (`polytrain model info` lists the registered ones); "
        "usually set by the preset or the checkpoint's config.json."
    )
    vocab_size: int = option(129280, "Vocabulary size (rows of the embedding and the output head).", ge=1)
    hidden_size: int = option(7168, "Width of the residual stream.", ge=1)
    num_hidden_layers: int = option(61, "Number of decoder layers.", ge=1)
    first_k_dense_replace: int = option(3, "The first k layers use a dense SwiGLU MLP; the rest are MoE.", ge=0)
    intermediate_size: int = option(18432, "Hidden width of the dense SwiGLU MLP.", ge=1)

    num_attention_heads: int = option(128, "Attention heads.", ge=1)
    q_lora_rank: int = option(1536, "Rank of the low-rank query projection; 0 projects queries directly.", ge=0)
    qk_rope_head_dim: int = option(64, "Per-head query/key width that carries the rotary position embedding.", ge=2)
    rope_theta: float = option(10000.0, "RoPE base frequency.", gt=0)
    rope_scaling: Literal["none", "yarn"] = option("none", "Context-extension scaling of the rotary frequencies.")
    yarn_factor: float = option(1.0, "YaRN: context extension factor (`rope_scaling.factor`).", ge=1)
    yarn_original_max_position_embeddings: int = option(4096, "YaRN: the pre-extension context length.", ge=1)
    yarn_beta_fast: float = option(32.0, "YaRN: rotations above which frequencies are kept (extrapolated).", gt=0)
    yarn_beta_slow: float = option(1.0, "YaRN: rotations below which frequencies are interpolated.", gt=0)
    yarn_mscale: float = option(1.0, "YaRN: `mscale` of the cos/sin attention factor (0 = unset).", ge=0)
    yarn_mscale_all_dim: float = option(
        0.0, "YaRN: `mscale_all_dim`; when set, the softmax scale is multiplied by its mscale squared.", ge=0
    )
    yarn_attention_factor: float = option(0.0, "YaRN: explicit cos/sin scale (0 = derived from the mscales).", ge=0)
    max_position_embeddings: int = option(4096, "Longest sequence the model is used with.", ge=1)

    # DeepSeekMoE
    n_routed_experts: int = option(256, "Routed experts per MoE layer.", ge=1)
    num_experts_per_tok: int = option(8, "Routed experts chosen per token (top-k).", ge=1)
    n_shared_experts: int = option(1, "Shared experts (always active) per MoE layer.", ge=0)
    moe_intermediate_size: int = option(2048, "Hidden width of one expert.", ge=1)
    n_group: int = option(8, "Expert groups for group-limited routing (1 disables the group limit).", ge=1)
    topk_group: int = option(4, "Groups a token may route to (ranked by the sum of each group's top-2 scores).", ge=1)
    scoring_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = option(
        "sigmoid", "Router affinity function (V3: sigmoid; V4: sqrtsoftplus)."
    )
    norm_topk_prob: bool = option(True, "Renormalise the chosen experts' weights to sum to 1.")
    routed_scaling_factor: float = option(2.5, "Multiplier on the routed experts' weights.", gt=0)
    aux_loss_alpha: float = option(
        0.0, "Sequence-wise balance loss coefficient (DeepSeek-V3 report: 1e-4); 0 disables it.", ge=0
    )
    swiglu_limit: float = option(0.0, "Clamp of the expert SwiGLU gate (above) and up (both sides); 0 = off "
                                 "(DeepSeek-V4: 10).", ge=0)
    num_nextn_predict_layers: int = option(0, "Multi-token-prediction depth (MTP modules after the last layer).", ge=0)

    rms_norm_eps: float = option(1e-6, "Epsilon of every RMSNorm.", gt=0)
    tie_word_embeddings: bool = option(False, "Share the embedding matrix with the output head.")
    initializer_range: float = option(0.02, "Std of the normal initialisation of weights.", gt=0)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def tensor_parallel_splits(self) -> dict[str, int]:
        """The sizes tensor parallelism splits over its ranks, by field: each must be a multiple of parallel.tp."""
        return {"num_attention_heads": self.num_attention_heads}

    def validate(self) -> None:
        """Checks every family shares; a family's class extends it with its own."""
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
