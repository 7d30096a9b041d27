"""The DeepSeek-V4 causal LM: hyper-connected streams through blocks of hybrid attention and DeepSeekMoE (the
first `num_hash_layers` hash-routed), collapsed by a hyper head, normalised, projected to the vocabulary; MTP
modules of the same shape after the last layer."""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models.config import ModelConfig
from polytrain.models.hybrid_attention import Compressor, HybridAttention
from polytrain.models.hyper_connections import HyperConnection, HyperHead, merge
from polytrain.models.layers import RMSNorm
from polytrain.models.moe import GroupedExperts, HashRouter, MoE, Router
from polytrain.models.output_head import OutputHead
from polytrain.models.rope import RotaryEmbedding
from polytrain.models.transformer import TrainOutput, shift_left


class V4Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HybridAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, hash_routed=layer_idx < config.num_hash_layers)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(
        self,
        streams: torch.Tensor,
        ropes: dict[str, RotaryEmbedding],
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
        input_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        post, comb, collapsed = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(collapsed), ropes, tables, position_ids)
        streams = merge(streams, attn, post, comb)
        post, comb, collapsed = self.ffn_hc(streams)
        mlp = self.mlp(self.post_attention_layernorm(collapsed), input_ids, token_mask)
        return merge(streams, mlp, post, comb)


class V4MTPModule(nn.Module):
    """MTP depth k: streams = h_proj(hnorm(previous streams)) + e_proj(enorm(emb(t[i+k]))), one V4 block, its own
    hyper head, norm; the shared output head predicts token i+k+1."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.e_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.h_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.block = V4Block(config, layer_idx)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class V4CausalLM(nn.Module):
    supports_kv_cache = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.ropes = nn.ModuleDict({
            "main": RotaryEmbedding(config, theta=config.rope_theta, scaled=False),
            "compress": RotaryEmbedding(config, theta=config.compress_rope_theta, scaled=True),
        })
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = OutputHead(config.hidden_size, config.vocab_size)
        self.mtp = nn.ModuleList(
            V4MTPModule(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _streams(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        if doc_ids is not None and bool((doc_ids.amax(dim=1) > 0).any()):
            raise ValueError("DeepSeek-V4 compressed attention does not support packed documents (data.packing)")
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        tables = {name: rope(position_ids) for name, rope in self.ropes.items()}
        streams = self.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, self.ropes, tables, position_ids, input_ids, token_mask)
        return streams, tables, position_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: object | None = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, position_ids, doc_ids, cache, valid, token_mask))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: object | None = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cache is not None:
            raise NotImplementedError("DeepSeek-V4 models decode without a KV cache in polytrain (yet)")
        streams, _, _ = self._streams(input_ids, position_ids, doc_ids, token_mask)
        return self.norm(self.hc_head(streams))

    def forward_train(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> TrainOutput:
        streams, tables, position_ids = self._streams(input_ids, position_ids, doc_ids, token_mask)
        mtp_hidden = []
        previous = streams
        for k, module in enumerate(self.mtp, start=1):
            shifted = shift_left(input_ids, k, 0)
            embedded = module.e_proj(module.enorm(self.embed_tokens(shifted)))
            previous = module.h_proj(module.hnorm(previous)) + embedded.unsqueeze(2)
            previous = module.block(previous, self.ropes, tables, position_ids, shifted, token_mask)
            mtp_hidden.append(module.norm(module.hc_head(previous)))
        losses = [m.aux_loss for m in self.modules() if isinstance(m, Router) and m.aux_loss is not None]
        aux = torch.stack(losses).sum() if losses else None
        return TrainOutput(self.norm(self.hc_head(streams)), mtp_hidden, aux)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices and mHC maps; ones for norms and mHC scales; zeros for
        biases, sinks and pooling biases; a seeded random expert table for hash-routed layers."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        cfg = self.config
        std = cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (Router, HashRouter)):
                module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, Router):
                    module.e_score_correction_bias.zero_()
                else:
                    scores = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=generator,
                                        device=module.weight.device)
                    module.tid2eid.copy_(scores.argsort(dim=-1)[:, : cfg.num_experts_per_tok])
            elif isinstance(module, GroupedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, HyperConnection):
                module.fn.normal_(0.0, std, generator=generator)
                module.base.zero_()
                module.scale.fill_(1.0)
            elif isinstance(module, HyperHead):
                module.hc_fn.normal_(0.0, std, generator=generator)
                module.hc_base.zero_()
                module.hc_scale.fill_(1.0)
            elif isinstance(module, Compressor):
                module.position_bias.zero_()
            elif isinstance(module, HybridAttention):
                module.sinks.zero_()
