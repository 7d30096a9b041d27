"""The DeepSeek-V3 causal LM: embedding, decoder blocks (MLA + dense MLP or MoE), final norm, output head, and
optional multi-token-prediction (MTP) modules.

Plain PyTorch with no distribution inside; polytrain.parallel applies sharding from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polytrain.models.common.context_split import context_mask
from polytrain.models.common.decoder import DecoderLM
from polytrain.models.common.layers import RMSNorm, SwiGLU
from polytrain.models.common.moe import MoE
from polytrain.models.common.output_head import OutputHead
from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v3.attention import MLA
from polytrain.models.deepseek_v3.config import DeepSeekV3Config
from polytrain.models.deepseek_v3.kv_cache import KVCache


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DeepSeekV3Config, layer_idx: int) -> None:
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
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        normed = self.post_attention_layernorm(x)
        return x + (self.mlp(normed, token_mask=token_mask) if isinstance(self.mlp, MoE) else self.mlp(normed))


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 report, section 2.2).

    At position i it combines the previous depth's hidden state with the embedding of token i+k:
    h = eh_proj([enorm(emb(t[i+k])); hnorm(h_prev[i])]), runs one decoder block, and normalises; the shared output
    head then predicts token i+k+1. HF checkpoints store it as layer `num_hidden_layers + k - 1`.
    """

    def __init__(self, config: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        previous: torch.Tensor,
        next_embeddings: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state for the next depth, normalised hidden state for the output head)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(previous)], dim=-1))
        x = self.block(x, rope, mask, token_mask=token_mask)
        return x, self.norm(x)


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



@dataclass
class LayerInputs:
    """What every block of a forward takes besides the residual stream."""

    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    cache: KVCache | None
    valid: torch.Tensor | None
    token_mask: torch.Tensor | None


class DeepSeekV3LM(DecoderLM):
    supports_kv_cache = True
    supports_routing_replay = True

    def __init__(self, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = OutputHead(config.hidden_size, config.vocab_size)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.tie_weights()

    def layer_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None,
                     token_mask: torch.Tensor | None, cache: KVCache | None = None,
                     valid: torch.Tensor | None = None) -> LayerInputs:
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        split = self.context_split
        if split is not None and cache is None:  # this rank's chunks of each row: masks in whole-row positions
            if position_ids is None:
                position_ids = split.positions(seq * split.size, input_ids.device).expand(batch, seq)
            mask = context_mask(split, seq, doc_ids, input_ids.device)
            return LayerInputs(self.rotary(position_ids), mask, None, valid, token_mask)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        key_valid = None
        if cache is not None:
            if valid is None:
                valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
            key_valid = torch.cat([cache.key_valid[:, :past], valid], dim=1)
        mask = attention_mask(doc_ids, key_valid, past, seq)
        return LayerInputs(self.rotary(position_ids), mask, cache, valid, token_mask)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def state_shape(self, rows: int, width: int) -> tuple[int, ...]:
        return (rows, width, self.config.hidden_size)

    def run_block(self, block: nn.Module, state: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        return block(state, inputs.rope, inputs.mask, inputs.cache, token_mask=inputs.token_mask)

    def end_of_layers(self, inputs: LayerInputs) -> None:
        if inputs.cache is not None:
            inputs.cache.advance(inputs.valid)

    def head_input(self, state: torch.Tensor) -> torch.Tensor:
        return self.norm(state)

    def run_mtp(self, module: nn.Module, previous: torch.Tensor, next_embeddings: torch.Tensor,
                inputs: LayerInputs, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        return module(previous, next_embeddings, inputs.rope, inputs.mask, inputs.token_mask)

    def stage_modules(self, first: bool, last: bool) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"rotary": self.rotary}
        if first:
            modules["embed_tokens"] = self.embed_tokens
        if last:
            modules.update(norm=self.norm, lm_head=self.lm_head, mtp=self.mtp)
        return modules

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        param = self.embed_tokens.weight
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, param.dtype, param.device
        )
