"""The DeepSeek-V3-style causal LM: embedding, decoder blocks (MLA + dense MLP or MoE), final norm, output head.

Plain PyTorch with no distribution inside; polytrain.parallel applies sharding from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models.attention import MLA, RotaryEmbedding
from polytrain.models.config import ModelConfig
from polytrain.models.kv_cache import KVCache
from polytrain.models.layers import RMSNorm, SwiGLU
from polytrain.models.moe import GroupedExperts, MoE, Router


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(
    doc_ids: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    past_len: int,
    seq_len: int,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, S] (True = may attend), or None when plain causal attention is exact.

    `doc_ids` [B, T] separates packed documents: a token sees only earlier tokens of its own document. `key_valid`
    [B, S] (S = past_len + T) hides left padding during generation. Every query may always see itself, so no row is
    empty (an empty softmax row would be NaN even where the loss ignores it).
    """
    if doc_ids is None and key_valid is None:
        return None
    total = past_len + seq_len
    device = doc_ids.device if doc_ids is not None else key_valid.device
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if doc_ids is not None:
        if past_len:
            raise ValueError("packed documents (doc_ids) cannot be combined with a KV cache")
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T].

        position_ids [B, T]: rotary positions (restart at 0 per packed document); defaults to 0..T-1 after the cache.
        doc_ids [B, T]: document of each token when several are packed in one row (training).
        cache / valid [B, T]: incremental decoding; `valid` marks real tokens (False = left padding).
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, doc_ids, cache, valid))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, hidden] (what the output head multiplies)."""
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        key_valid = None
        if cache is not None:
            if valid is None:
                valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
            key_valid = torch.cat([cache.key_valid[:, :past], valid], dim=1)
        mask = attention_mask(doc_ids, key_valid, past, seq)
        rope = self.rotary(position_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(valid)
        return self.norm(x)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        param = self.embed_tokens.weight
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, param.dtype, param.device
        )

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)


def build_model(config: ModelConfig, device: torch.device | str = "meta", seed: int | None = 0) -> CausalLM:
    """Allocate the model on `device` and initialise it (meta-device models are left uninitialised)."""
    with torch.device(device):
        model = CausalLM(config)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
