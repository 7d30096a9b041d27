"""Tensor names: polytrain's state dict <-> the Hugging Face / DeepSeek-V3 release layout.

polytrain keeps HF's module names, so most tensors only gain a `model.` prefix. The differences:
- routed experts are stacked per layer (`layers.N.mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]);
  the release stores one tensor per expert and projection (`model.layers.N.mlp.experts.E.gate_proj.weight`, ...);
- MTP module k is `mtp.k.*` here and layer `num_hidden_layers + k` there, whose `shared_head.norm` is our
  `mtp.k.norm` and whose `embed_tokens` / `shared_head.head` are copies of the shared embedding / output head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from polytrain.models.config import ModelConfig

EXPERT = re.compile(r"^(?:layers\.(\d+)|mtp\.(\d+)\.block)\.mlp\.experts\.(gate_up_proj|down_proj)$")
MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
HF_MTP_COPY = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")


class StackedExperts:
    """Moves stacked expert weights to and from the release's one-tensor-per-expert-and-projection layout; a
    subclass names the projections (`EXPERT_PROJ`: gate, up, down) and maps everything else (`hf_name`)."""

    EXPERT_PROJ: tuple[str, str, str]
    config: ModelConfig

    def hf_name(self, name: str) -> str:
        raise NotImplementedError

    def _expert_prefix(self, name: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def _per_expert(self, prefix: str, kind: str, stacked: torch.Tensor,
                    first_expert: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(release name, view of `stacked`) for every expert in the stack, numbered from first_expert."""
        hidden = self.config.moe_intermediate_size
        gate, up, down = self.EXPERT_PROJ
        for local in range(stacked.shape[0]):
            expert = first_expert + local
            if kind == "down_proj":
                yield f"{prefix}.{expert}.{down}.weight", stacked[local]
            else:
                yield f"{prefix}.{expert}.{gate}.weight", stacked[local, :hidden]
                yield f"{prefix}.{expert}.{up}.weight", stacked[local, hidden:]

    def load_into(self, name: str, dest: torch.Tensor, read: Callable[[str, torch.Size], torch.Tensor],
                  first_expert: int = 0) -> None:
        """Fill `dest` (the polytrain tensor, or for experts the slice holding experts first_expert...) from HF
        tensors obtained with `read(hf_name, expected_shape)`, one HF tensor at a time."""
        expert = self._expert_prefix(name)
        parts = [(self.hf_name(name), dest)] if expert is None else self._per_expert(*expert, dest, first_expert)
        for hf_name, target in parts:
            target.copy_(read(hf_name, target.shape))

    def to_hf(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF tensors of one polytrain tensor (views where possible; no copy of the whole stack)."""
        expert = self._expert_prefix(name)
        if expert is None:
            yield self.hf_name(name), tensor
        else:
            yield from self._per_expert(*expert, tensor, 0)


class V3Names(StackedExperts):
    EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")

    def candidates(self, hf_name: str) -> list[str]:
        return [hf_name]

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.first_mtp_layer = config.num_hidden_layers

    def hf_name(self, name: str) -> str:
        """The HF name of a polytrain tensor that maps one to one (everything but stacked experts)."""
        if name == "lm_head.weight":
            return name
        match = MTP.match(name)
        if match:
            layer = f"model.layers.{self.first_mtp_layer + int(match.group(1))}"
            rest = match.group(2)
            if rest.startswith("block."):
                return f"{layer}.{rest[len('block.'):]}"
            if rest == "norm.weight":
                return f"{layer}.shared_head.norm.weight"
            return f"{layer}.{rest}"
        return f"model.{name}"

    def _expert_prefix(self, name: str) -> tuple[str, str] | None:
        """(HF prefix of the per-expert tensors, gate_up_proj | down_proj) for a stacked expert weight."""
        match = EXPERT.match(name)
        if not match:
            return None
        layer, mtp, kind = match.groups()
        index = int(layer) if layer is not None else self.first_mtp_layer + int(mtp)
        return f"model.layers.{index}.mlp.experts", kind

    def shared_copies(self, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """The release repeats the embedding and output head inside every MTP layer."""
        for k in range(self.config.num_nextn_predict_layers):
            layer = f"model.layers.{self.first_mtp_layer + k}"
            yield f"{layer}.embed_tokens.weight", state["embed_tokens.weight"]
            yield f"{layer}.shared_head.head.weight", state["lm_head.weight"]

    def is_shared_copy(self, hf_name: str) -> bool:
        match = HF_MTP_COPY.match(hf_name)
        return bool(match) and int(match.group(1)) >= self.first_mtp_layer

    def is_mtp_tensor(self, hf_name: str) -> bool:
        match = re.match(r"^model\.layers\.(\d+)\.", hf_name)
        return bool(match) and int(match.group(1)) >= self.first_mtp_layer


# DeepSeek-V4 release names of the tensors inside one layer (or MTP module), keyed by polytrain's names.
V4_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.indexer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
for _ours, _theirs in (("self_attn.compressor", "attn.compressor"),
                       ("self_attn.indexer.compressor", "attn.indexer.compressor")):
    V4_LAYER.update({
        f"{_ours}.kv_proj.weight": f"{_theirs}.wkv.weight",
        f"{_ours}.gate_proj.weight": f"{_theirs}.wgate.weight",
        f"{_ours}.position_bias": f"{_theirs}.ape",
        f"{_ours}.kv_norm.weight": f"{_theirs}.norm.weight",
    })
V4_TOP = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
          "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
V4_MTP_OWN = {"enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight", "norm.weight"}
# transformers' save_pretrained writes a few names differently from the release; accepted when reading
V4_TRANSFORMERS_ALIASES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                           "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
                           "hc_head_scale": "model.hc_head.hc_scale"}
V4_EXPERT = re.compile(r"^(layers\.\d+|mtp\.\d+\.block)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class V4Names(StackedExperts):
    """polytrain <-> DeepSeek-V4 release names (`layers.N.attn.wq_a.weight`, `ffn.experts.E.w1.weight`, `mtp.k.*`),
    reading transformers' save_pretrained variant (`model.` prefix, `attn.norm`) as well."""

    EXPERT_PROJ = ("w1", "w3", "w2")

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def hf_name(self, name: str) -> str:
        if name in V4_TOP:
            return V4_TOP[name]
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match:
            return f"layers.{match.group(1)}.{V4_LAYER[match.group(2)]}"
        match = MTP.match(name)
        if match:
            k, rest = match.groups()
            if rest.startswith("block."):
                return f"mtp.{k}.{V4_LAYER[rest[len('block.'):]]}"
            if rest.startswith("hc_head."):
                return f"mtp.{k}.hc_head_{rest[len('hc_head.hc_'):]}"
            if rest in V4_MTP_OWN:
                return f"mtp.{k}.{rest}"
        raise KeyError(f"no DeepSeek-V4 checkpoint name for `{name}`")

    def candidates(self, hf_name: str) -> list[str]:
        """Names to look for, release name first."""
        out = [hf_name, f"model.{hf_name}"]
        if hf_name in V4_TRANSFORMERS_ALIASES:
            out.append(V4_TRANSFORMERS_ALIASES[hf_name])
        if hf_name.endswith("attn.kv_norm.weight"):
            alias = hf_name.replace("attn.kv_norm.weight", "attn.norm.weight")
            out += [alias, f"model.{alias}"]
        return out

    def _expert_prefix(self, name: str) -> tuple[str, str] | None:
        match = V4_EXPERT.match(name)
        if not match:
            return None
        owner, kind = match.groups()
        owner = owner.replace(".block", "")
        return f"{owner}.ffn.experts", kind

    def shared_copies(self, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for k in range(self.config.num_nextn_predict_layers):
            yield f"mtp.{k}.emb.tok_emb.weight", state["embed_tokens.weight"]
            yield f"mtp.{k}.head.weight", state["lm_head.weight"]

    def is_shared_copy(self, hf_name: str) -> bool:
        return bool(re.match(r"^mtp\.\d+\.(emb\.tok_emb|head)\.weight$", hf_name))

    def is_mtp_tensor(self, hf_name: str) -> bool:
        return hf_name.startswith(("mtp.", "model.mtp."))


def names_for(config: ModelConfig) -> V3Names | V4Names:
    return V4Names(config) if config.is_v4 else V3Names(config)
