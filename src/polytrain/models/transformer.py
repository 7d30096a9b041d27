"""The DeepSeek-V3-style causal LM: embedding, decoder blocks (MLA + dense MLP or MoE), final norm, output head,
and optional multi-token-prediction (MTP) modules.

Plain PyTorch with no distribution inside; polytrain.parallel applies sharding from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polytrain.models.attention import MLA
from polytrain.models.config import ModelConfig
from polytrain.models.kv_cache import KVCache
from polytrain.models.layers import RMSNorm, SwiGLU
from polytrain.models.moe import GroupedExperts, MoE, Router
from polytrain.models.output_head import OutputHead
from polytrain.models.rope import RotaryEmbedding


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

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
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


@dataclass
class TrainOutput:
    hidden: torch.Tensor
    """Final-norm hidden states [B, T, hidden] of the main model."""
    mtp_hidden: list[torch.Tensor]
    """Per MTP depth k (1-based position k-1): normalised hidden states [B, T, hidden] predicting token i+k+1."""
    aux_loss: torch.Tensor | None
    """Sum of the MoE layers' sequence-wise balance losses (None when disabled)."""


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


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i] <- x[:, i + k], with `fill` in the last k columns."""
    out = torch.full_like(x, fill)
    out[:, :-k] = x[:, k:]
    return out


class CausalLM(nn.Module):
    supports_kv_cache = True

    def __init__(self, config: ModelConfig) -> None:
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
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _trunk(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
        valid: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(last layer's residual stream before the final norm, rope tables, attention mask)."""
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
            x = layer(x, rope, mask, cache, token_mask=token_mask)
        if cache is not None:
            cache.advance(valid)
        return x, rope, mask

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of the main model for `input_ids` [B, T].

        position_ids [B, T]: rotary positions (restart at 0 per packed document); defaults to 0..T-1 after the cache.
        doc_ids [B, T]: document of each token when several are packed in one row (training).
        cache / valid [B, T]: incremental decoding; `valid` marks real tokens (False = left padding).
        token_mask [B, T]: False on padding, which then never counts in the expert load (training).
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, doc_ids, cache, valid, token_mask))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, hidden] (what the output head multiplies)."""
        return self.norm(self._trunk(input_ids, position_ids, doc_ids, cache, valid, token_mask)[0])

    def forward_train(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> TrainOutput:
        """Everything a training loss needs: main hidden states, MTP hidden states and the balance loss.
        token_mask [B, T] (False on padding) keeps padding out of the expert load and the balance loss."""
        x, rope, mask = self._trunk(input_ids, position_ids, doc_ids, None, None, token_mask)
        mtp_hidden = []
        previous = x
        for k, module in enumerate(self.mtp, start=1):
            next_embeddings = self.embed_tokens(shift_left(input_ids, k, 0))
            previous, normed = module(previous, next_embeddings, rope, mask, token_mask)
            mtp_hidden.append(normed)
        losses = [m.aux_loss for m in self.modules() if isinstance(m, Router) and m.aux_loss is not None]
        return TrainOutput(self.norm(x), mtp_hidden, torch.stack(losses).sum() if losses else None)

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
    """Allocate the model of `config.architecture` on `device` and initialise it (meta-device models are left
    uninitialised). DeepSeek-V4 models (`V4CausalLM`) have the same methods."""
    from polytrain.models.v4 import V4CausalLM

    with torch.device(device):
        model = V4CausalLM(config) if config.is_v4 else CausalLM(config)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
