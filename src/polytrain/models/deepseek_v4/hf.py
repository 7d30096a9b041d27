"""DeepSeek-V4 <-> Hugging Face: tensor names (the release's `layers.N.attn.wq_a.weight`, `ffn.experts.E.w1.weight`,
`mtp.k.*`, and transformers' save_pretrained variant) and config.json (the release keys and transformers'
`layer_types` / `mlp_layer_types` / nested `rope_parameters`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from polytrain.errors import ConfigError
from polytrain.models.deepseek_v4.config import DeepSeekV4Config
from polytrain.models.hf.config import rope_fields, yarn_fields
from polytrain.models.hf.names import MTP, StackedExperts

LAYER_TYPE_KEYS = {"sliding_attention": None, "compressed_sparse_attention": "csa",
                   "heavily_compressed_attention": "hca"}


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

    def __init__(self, config: DeepSeekV4Config) -> None:
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




class V4Format:
    hf_class = "DeepseekV4ForCausalLM"
    hf_reward_class = None  # transformers has no DeepseekV4ForSequenceClassification
    keys = ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rope_theta", "index_n_heads",
            "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit", "num_hash_layers",
            "compress_ratios")

    def names(self, config: DeepSeekV4Config) -> V4Names:
        return V4Names(config)

    def read_config(self, hf: dict[str, Any], values: dict[str, Any], where: str) -> None:
        """compress_ratios / num_hash_layers from the release keys or from transformers' layer_types."""
        if hf.get("num_key_value_heads", 1) != 1:
            raise ConfigError("DeepSeek-V4 attention has one shared key/value head (num_key_value_heads = 1)")
        params = hf.get("rope_parameters") or {}
        if isinstance(params.get("main"), dict):  # transformers' format: one entry per attention kind
            main, compress = params["main"], params.get("compress") or {}
            values["rope_theta"] = float(main.get("rope_theta", 10000.0))
            if "rope_theta" in compress:
                values["compress_rope_theta"] = float(compress["rope_theta"])
            if compress.get("rope_type") == "yarn":
                values.update(yarn_fields(compress))
        else:
            values.update(rope_fields(hf, where))
        rates = {"csa": 4, "hca": 128}
        for name, key in (("compressed_sparse_attention", "csa"), ("heavily_compressed_attention", "hca")):
            rates[key] = int((hf.get("compress_rates") or {}).get(name, rates[key]))
        values["compress_ratio_csa"] = rates["csa"]
        if "compress_ratios" not in values and hf.get("layer_types"):
            unknown = [t for t in hf["layer_types"] if t not in LAYER_TYPE_KEYS]
            if unknown:
                raise ConfigError(f"unknown V4 layer types {unknown}")
            ratios = [rates[LAYER_TYPE_KEYS[t]] if LAYER_TYPE_KEYS[t] else 0 for t in hf["layer_types"]]
            values["compress_ratios"] = ratios + [0] * int(hf.get("num_nextn_predict_layers") or 0)
        if "num_hash_layers" not in values:
            kinds = hf.get("mlp_layer_types") or []
            values["num_hash_layers"] = next((i for i, k in enumerate(kinds) if k != "hash_moe"), len(kinds))
        if "qk_rope_head_dim" not in values:
            values["qk_rope_head_dim"] = int(hf.get("head_dim", 512) * (hf.get("partial_rotary_factor") or 0.125))
        values.update(first_k_dense_replace=0, n_group=1, topk_group=1,
                      intermediate_size=values.get("moe_intermediate_size", 2048),
                      scoring_func=hf.get("scoring_func", "sqrtsoftplus"))
        if values.get("rope_scaling") == "yarn":
            values["yarn_attention_factor"] = 1.0  # V4 does not rescale cos / sin (the reference omits YaRN's mscale)

    def write_config(self, config: DeepSeekV4Config, out: dict[str, Any]) -> None:
        # the release's per-layer list, plus transformers' own keys (its legacy reader knows only ratios 4 and 128)
        out["num_key_value_heads"] = 1
        ratios = list(config.compress_ratios)
        hca = next((r for r in ratios if r and r != config.compress_ratio_csa), 128)
        out["compress_ratios"] = ratios
        out["compress_rates"] = {"compressed_sparse_attention": config.compress_ratio_csa,
                                 "heavily_compressed_attention": hca}
        out["layer_types"] = [
            "sliding_attention" if not r else
            "compressed_sparse_attention" if r == config.compress_ratio_csa else "heavily_compressed_attention"
            for r in ratios[: config.num_hidden_layers]
        ]
        out["mlp_layer_types"] = ["hash_moe" if i < config.num_hash_layers else "moe"
                                  for i in range(config.num_hidden_layers)]
