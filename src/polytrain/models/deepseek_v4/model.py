"""The DeepSeek-V4 causal LM: hyper-connected streams through blocks of hybrid attention and DeepSeekMoE (the
first `num_hash_layers` hash-routed), collapsed by a hyper head, normalised, projected to the vocabulary; MTP
modules of the same shape after the last layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polytrain.models.common.decoder import DecoderLM, shift_left
from polytrain.models.common.init import InitRule
from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.moe import MoE
from polytrain.models.common.output_head import OutputHead
from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v4.attention import Compressor, HybridAttention
from polytrain.models.deepseek_v4.config import DeepSeekV4Config
from polytrain.models.deepseek_v4.context import WholeRows, whole_rows
from polytrain.models.deepseek_v4.hyper_connections import HyperConnection, HyperHead, merge
from polytrain.models.deepseek_v4.kv_cache import V4KVCache
from polytrain.models.deepseek_v4.packing import PackedRows, packed_rows


class V4Block(nn.Module):
    def __init__(self, config: DeepSeekV4Config, layer_idx: int) -> None:
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
        cache: V4KVCache | None = None,
        packed: PackedRows | None = None,
        whole: WholeRows | None = None,
    ) -> torch.Tensor:
        post, comb, collapsed = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(collapsed), ropes, tables, position_ids, cache, packed, whole)
        streams = merge(streams, attn, post, comb)
        post, comb, collapsed = self.ffn_hc(streams)
        mlp = self.mlp(self.post_attention_layernorm(collapsed), input_ids, token_mask)
        return merge(streams, mlp, post, comb)


class V4MTPModule(nn.Module):
    """MTP depth k: streams = h_proj(hnorm(previous streams)) + e_proj(enorm(emb(t[i+k]))), one V4 block, its own
    hyper head, norm; the shared output head predicts token i+k+1."""

    def __init__(self, config: DeepSeekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.e_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.h_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.block = V4Block(config, layer_idx)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        previous: torch.Tensor,
        next_embeddings: torch.Tensor,
        ropes: dict[str, RotaryEmbedding],
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
        shifted_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        packed: PackedRows | None = None,
        whole: WholeRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(streams for the next depth, hidden states for the output head)."""
        embedded = self.e_proj(self.enorm(next_embeddings))
        streams = self.h_proj(self.hnorm(previous)) + embedded.unsqueeze(2)
        streams = self.block(streams, ropes, tables, position_ids, shifted_ids, token_mask, None, packed, whole)
        return streams, self.norm(self.hc_head(streams))


@dataclass
class LayerInputs:
    """What every block of a forward takes besides the streams."""

    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
    position_ids: torch.Tensor
    input_ids: torch.Tensor
    token_mask: torch.Tensor | None
    cache: V4KVCache | None = None
    packed: PackedRows | None = None
    whole: WholeRows | None = None
    """Under context parallelism: the whole rows this rank's chunks come from."""


class DeepSeekV4LM(DecoderLM):
    supports_kv_cache = True

    def __init__(self, config: DeepSeekV4Config) -> None:
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
        self.tie_weights()

    def layer_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None,
                     token_mask: torch.Tensor | None, cache: V4KVCache | None = None,
                     valid: torch.Tensor | None = None) -> LayerInputs:
        batch, seq = input_ids.shape
        split = self.context_split
        if split is not None and cache is None:  # this rank's chunks of each row: attention sees the whole rows
            defaulted = position_ids is None
            if defaulted:
                position_ids = split.positions(seq * split.size, input_ids.device).expand(batch, seq)
            whole = whole_rows(split, position_ids, doc_ids, self._ratios())
            if defaulted and whole.packed is not None:  # the same on every rank: the documents are gathered
                raise ValueError("packed documents (doc_ids) need their position_ids")
            tables = {name: rope(position_ids) for name, rope in self.ropes.items()}
            return LayerInputs(tables, position_ids, input_ids, token_mask, whole=whole)
        packed = None
        if doc_ids is not None and bool((doc_ids.amax(dim=1) > 0).any()):
            if cache is not None or position_ids is None:
                raise ValueError("packed documents (doc_ids) need their position_ids and no KV cache")
            packed = packed_rows(doc_ids, position_ids, self._ratios())
        if cache is not None:  # positions are the cache's: rows are right-aligned (see hidden_states)
            lengths = None if valid is None else valid.sum(dim=1)
            cache.begin(seq, lengths if seq > 1 else None)
            if seq == 1:
                position_ids = cache.lengths.view(-1, 1)
            else:
                position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        elif position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        tables = {name: rope(position_ids) for name, rope in self.ropes.items()}
        return LayerInputs(tables, position_ids, input_ids, token_mask, cache, packed)

    def _ratios(self) -> set[int]:
        return {r for r in self.config.compress_ratios if r}

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: V4KVCache | None = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As DecoderLM's; a prefill of a left-padded batch into a cache runs with each row moved to the front
        (V4's windows and compressed entries count from a row's first token), the output moved back."""
        batch, seq = input_ids.shape
        if cache is None or seq == 1:
            return super().hidden_states(input_ids, position_ids, doc_ids, cache, valid, token_mask)
        if valid is None:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
        shift = (seq - valid.sum(dim=1)).view(-1, 1)
        rows = torch.arange(batch, device=input_ids.device).view(-1, 1)
        columns = torch.arange(seq, device=input_ids.device)
        front = (columns + shift) % seq  # right-aligned column j holds left-padded column j + padding
        aligned = super().hidden_states(input_ids[rows, front], None, doc_ids, cache, valid[rows, front],
                                        None if token_mask is None else token_mask[rows, front])
        return aligned[rows, (columns - shift) % seq]

    def new_cache(self, batch: int, max_len: int) -> V4KVCache:
        return V4KVCache(self, batch, max_len)

    def end_of_layers(self, inputs: LayerInputs) -> None:
        if inputs.cache is not None:
            inputs.cache.advance()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()

    def state_shape(self, rows: int, width: int) -> tuple[int, ...]:
        return (rows, width, self.config.hc_mult, self.config.hidden_size)

    def run_block(self, block: nn.Module, state: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        return block(state, self.ropes, inputs.tables, inputs.position_ids, inputs.input_ids, inputs.token_mask,
                     inputs.cache, inputs.packed, inputs.whole)

    def head_input(self, state: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(state))

    def run_mtp(self, module: nn.Module, previous: torch.Tensor, next_embeddings: torch.Tensor,
                inputs: LayerInputs, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.whole is None:
            shifted = shift_left(inputs.input_ids, depth, 0)
        else:  # token i + depth may sit in another rank's chunk
            split = inputs.whole.split
            shifted = split.local(shift_left(split.gather(inputs.input_ids), depth, 0))
        return module(previous, next_embeddings, self.ropes, inputs.tables, inputs.position_ids, shifted,
                      inputs.token_mask, inputs.packed, inputs.whole)

    def stage_modules(self, first: bool, last: bool) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"ropes": self.ropes}
        if first:
            modules["embed_tokens"] = self.embed_tokens
        if last:
            modules.update(hc_head=self.hc_head, norm=self.norm, lm_head=self.lm_head, mtp=self.mtp)
        return modules

    def init_rule(self, module: nn.Module, name: str) -> InitRule | None:
        """The shared blocks' rules, plus: normal(0, initializer_range) mHC maps, ones for mHC scales, zeros for
        their biases, the attention sinks and the pooling biases."""
        std = self.config.initializer_range
        if isinstance(module, (HyperConnection, HyperHead)):
            if name in ("fn", "hc_fn"):
                return InitRule("normal", std)
            return InitRule("constant", 1.0 if name in ("scale", "hc_scale") else 0.0)
        if (isinstance(module, Compressor) and name == "position_bias") or (
                isinstance(module, HybridAttention) and name == "sinks"):
            return InitRule("constant", 0.0)
        return super().init_rule(module, name)
