"""DeepSeekV4Config: the DeepSeek-V4 family's fields (hybrid compressed attention, mHC, hash routing), and its
presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polytrain.errors import ConfigError
from polytrain.models.common.config import ModelConfig
from polytrain.schema import option

ARCHITECTURE = "deepseek_v4"


@dataclass
class DeepSeekV4Config(ModelConfig):
    architecture: str = option(ARCHITECTURE, "Model family: deepseek_v4 = hybrid compressed attention (CSA / HCA + "
                               "sliding window), hash-routed first layers, manifold-constrained hyper-connections.")
    first_k_dense_replace: int = option(0, "DeepSeek-V4 has no dense layers: must be 0.", ge=0, le=0)
    head_dim: int = option(512, "Width of each query head and of the single shared key/value head.", ge=2)
    o_groups: int = option(8, "Head groups of the grouped output projection.", ge=1)
    o_lora_rank: int = option(1024, "Per-group width of the grouped output projection.", ge=1)
    sliding_window: int = option(128, "Tokens each query sees in the sliding-window branch (itself included).",
                                 ge=1)
    compress_ratios: list[int] = option(
        [], "Per layer (then per MTP module) 0 = sliding window only, 4 = CSA, 128 = HCA (any m > 0 with the "
        "same role: `compress_ratio_csa` marks CSA)."
    )
    compress_ratio_csa: int = option(4, "The compression ratio that means compressed sparse attention.", ge=1)
    compress_rope_theta: float = option(160000.0, "RoPE base of the compressed branches (YaRN applies there).",
                                        gt=0)
    index_n_heads: int = option(64, "Lightning-indexer heads.", ge=1)
    index_head_dim: int = option(128, "Lightning-indexer head width.", ge=2)
    index_topk: int = option(512, "Compressed entries each query keeps in CSA layers.", ge=1)
    hc_mult: int = option(4, "Residual streams of the hyper-connections (mHC).", ge=1)
    hc_sinkhorn_iters: int = option(20, "Sinkhorn-Knopp iterations of the mHC mixing matrix.", ge=1)
    hc_eps: float = option(1e-6, "Numerical floor of the mHC weights.", gt=0)
    num_hash_layers: int = option(0, "The first layers route by a fixed token-id -> experts table (tid2eid).", ge=0)

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def tensor_parallel_splits(self) -> dict[str, int]:
        # the grouped output projection is split by head group (models/deepseek_v4/tp.py)
        return {**super().tensor_parallel_splits(), "o_groups": self.o_groups}

    def compress_ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (MTP module k is layer num_hidden_layers + k)."""
        return self.compress_ratios[layer] if layer < len(self.compress_ratios) else 0

    def validate(self) -> None:
        super().validate()
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
    architecture=ARCHITECTURE,
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
    # DeepSeek-V4 with every feature at toy size: CSA (ratio 4, indexer) / HCA (ratio 8) / sliding layers, hash
    # routing, mHC, clamped SwiGLU, sqrt-softplus routing, YaRN on the compressed branch, MTP.
    "tiny-v4": dict(
        preset="tiny-v4",
        architecture=ARCHITECTURE,
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
