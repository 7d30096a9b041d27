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
    architecture: Literal["deepseek_v3", "deepseek_v4"] = option(
        "deepseek_v3",
        "deepseek_v3: MLA attention, dense first layers, plain residuals. deepseek_v4: hybrid compressed attention "
        "(CSA / HCA + sliding window), hash-routed first layers, manifold-constrained hyper-connections.",
    )
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
    rope_interleave: bool = option(
        True, "RoPE rotates interleaved pairs (x0,x1),(x2,x3)... as DeepSeek's checkpoints expect; false: halves."
    )
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
    attention_bias: bool = option(False, "Bias on the q_a / kv_a / output projections.")

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
    num_nextn_predict_layers: int = option(0, "Multi-token-prediction depth (MTP modules after the last layer).", ge=0)

    # DeepSeek-V4 only
    head_dim: int = option(512, "V4: width of each query head and of the single shared key/value head.", ge=2)
    o_groups: int = option(8, "V4: head groups of the grouped output projection.", ge=1)
    o_lora_rank: int = option(1024, "V4: per-group width of the grouped output projection.", ge=1)
    sliding_window: int = option(128, "V4: tokens each query sees in the sliding-window branch (itself included).",
                                 ge=1)
    compress_ratios: list[int] = option(
        [], "V4: per layer (then per MTP module) 0 = sliding window only, 4 = CSA, 128 = HCA (any m > 0 with the "
        "same role: `compress_ratio_csa` marks CSA)."
    )
    compress_ratio_csa: int = option(4, "V4: the compression ratio that means compressed sparse attention.", ge=1)
    compress_rope_theta: float = option(160000.0, "V4: RoPE base of the compressed branches (YaRN applies there).",
                                        gt=0)
    index_n_heads: int = option(64, "V4: lightning-indexer heads.", ge=1)
    index_head_dim: int = option(128, "V4: lightning-indexer head width.", ge=2)
    index_topk: int = option(512, "V4: compressed entries each query keeps in CSA layers.", ge=1)
    hc_mult: int = option(4, "V4: residual streams of the hyper-connections (mHC).", ge=1)
    hc_sinkhorn_iters: int = option(20, "V4: Sinkhorn-Knopp iterations of the mHC mixing matrix.", ge=1)
    hc_eps: float = option(1e-6, "V4: numerical floor of the mHC weights.", gt=0)
    num_hash_layers: int = option(0, "V4: the first layers route by a fixed token-id -> experts table (tid2eid).",
                                  ge=0)
    swiglu_limit: float = option(0.0, "V4: clamp of the expert SwiGLU gate (above) and up (both sides); 0 = off.",
                                 ge=0)

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
        return self.architecture == "deepseek_v4" or layer >= self.first_k_dense_replace

    @property
    def is_v4(self) -> bool:
        return self.architecture == "deepseek_v4"

    def compress_ratio(self, layer: int) -> int:
        """V4: compression ratio of layer `layer` (MTP module k is layer num_hidden_layers + k)."""
        return self.compress_ratios[layer] if layer < len(self.compress_ratios) else 0

    def validate(self) -> None:
        if self.is_v4:
            self._validate_v4()
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


    def _validate_v4(self) -> None:
        if len(self.compress_ratios) < self.num_hidden_layers:
            raise ConfigError(
                f"`model.compress_ratios` has {len(self.compress_ratios)} entries; DeepSeek-V4 needs one per layer "
                f"({self.num_hidden_layers}), then optionally one per MTP module (missing ones mean 0)"
            )
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"`model.o_groups` ({self.o_groups}) must divide num_attention_heads x head_dim")
        if self.qk_rope_head_dim > self.head_dim or self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError("`model.qk_rope_head_dim` must fit in head_dim and index_head_dim")
        if not self.q_lora_rank:
            raise ConfigError("DeepSeek-V4 needs `model.q_lora_rank` > 0")
        if self.num_hash_layers > self.num_hidden_layers:
            raise ConfigError("`model.num_hash_layers` exceeds `model.num_hidden_layers`")


def v4_compress_ratios(layers: int, first: tuple[int, ...], mtp: int = 1) -> list[int]:
    """The released V4 layer pattern: `first`, then CSA (4) and HCA (128) alternating (CSA on even layers), then
    sliding-window-only MTP modules."""
    rest = [4 if i % 2 == 0 else 128 for i in range(len(first), layers)]
    return [*first, *rest, *([0] * mtp)]


# What DeepSeek-V4-Flash and -Pro share in their released config.json files.
V4_RELEASE: dict[str, Any] = dict(
    architecture="deepseek_v4",
    vocab_size=129280,
    first_k_dense_replace=0,
    head_dim=512,
    qk_rope_head_dim=64,
    o_lora_rank=1024,
    sliding_window=128,
    compress_rope_theta=160000.0,
    index_n_heads=64,
    index_head_dim=128,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    num_experts_per_tok=6,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    scoring_func="sqrtsoftplus",
    num_hash_layers=3,
    swiglu_limit=10.0,
    max_position_embeddings=1048576,
    rope_theta=10000.0,
    rope_scaling="yarn",
    yarn_factor=16.0,
    yarn_original_max_position_embeddings=65536,
    yarn_mscale=0.0,
    yarn_attention_factor=1.0,
    num_nextn_predict_layers=1,
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
    # DeepSeek-V4 with every feature at toy size: CSA (ratio 4, indexer) / HCA (ratio 8) / sliding layers, hash
    # routing, mHC, clamped SwiGLU, sqrt-softplus routing, YaRN on the compressed branch, MTP.
    "tiny-v4": dict(
        preset="tiny-v4",
        architecture="deepseek_v4",
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=0,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        compress_ratios=[0, 4, 8, 4, 0],
        compress_rope_theta=160000.0,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=3,
        hc_mult=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=32,
        n_group=1,
        topk_group=1,
        scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5,
        num_hash_layers=1,
        swiglu_limit=10.0,
        max_position_embeddings=1024,
        rope_scaling="yarn",
        yarn_factor=4.0,
        yarn_original_max_position_embeddings=64,
        yarn_mscale=0.0,
        yarn_attention_factor=1.0,
        num_nextn_predict_layers=1,
    ),
    # deepseek-ai/DeepSeek-V4-Flash config.json (284B total, 13B activated).
    "deepseek-v4-flash": dict(
        V4_RELEASE,
        preset="deepseek-v4-flash",
        hidden_size=4096,
        num_hidden_layers=43,
        num_attention_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        compress_ratios=v4_compress_ratios(43, (0, 0)),
        index_topk=512,
        n_routed_experts=256,
        moe_intermediate_size=2048,
        intermediate_size=2048,
        routed_scaling_factor=1.5,
    ),
    # deepseek-ai/DeepSeek-V4-Pro config.json (~1.6T total, 49B activated).
    "deepseek-v4-pro": dict(
        V4_RELEASE,
        preset="deepseek-v4-pro",
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        compress_ratios=v4_compress_ratios(61, (128, 128)),
        index_topk=1024,
        n_routed_experts=384,
        moe_intermediate_size=3072,
        intermediate_size=3072,
        routed_scaling_factor=2.5,
    ),
}


def model_config_from_table(table: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """A ModelConfig from a `[model]` table: `preset` gives the starting values, other keys override them.
    `custom` and `hf:<model_type>` (written into resolved configs of runs started from a checkpoint) start from the
    field defaults."""
    table = dict(table)
    preset = table.get("preset", "tiny")
    if preset not in PRESETS and preset != "custom" and not preset.startswith(("hf:", "run:")):
        raise ConfigError(
            f"unknown model preset `{preset}`{closest(preset, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    values = {**PRESETS.get(preset, {}), **table}
    return from_dict(ModelConfig, values, prefix)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with field overrides (for tests and scripts)."""
    return model_config_from_table({"preset": name, **overrides})
