"""Tiny random Hugging Face DeepSeek models, saved by transformers itself: the reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

V3_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
             n_group=4, topk_group=2, n_shared_experts=1, max_position_embeddings=512)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# 16 indexer heads: with few heads, many compressed entries score exactly 0 (every head's ReLU at 0), and
# transformers' torch.topk orders such ties differently from polytrain's stable choice (earlier entry first).
V4_KW = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
             head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
             index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8, hc_mult=4,
             layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                          "compressed_sparse_attention"],
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
             mlp_layer_types=["hash_moe", "moe", "moe", "moe"], partial_rotary_factor=0.25,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1},
             max_position_embeddings=256)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the init defaults (zero biases, unit norms) so every path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.1 if param.ndim > 1 else 0.3))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape,
                                                                 generator=generator) * 0.1)
            if hasattr(module, "tid2eid"):
                table = torch.rand(module.tid2eid.shape[0], 8, generator=generator).argsort(-1)
                module.tid2eid.copy_(table[:, : module.tid2eid.shape[1]])


def make_hf_v3(path: Path, yarn: bool = False, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(V3_KW, rope_parameters=YARN) if yarn else V3_KW
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return model


def make_hf_v4(path: Path, seed: int = 0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(DeepseekV4Config(**V4_KW)).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return model
