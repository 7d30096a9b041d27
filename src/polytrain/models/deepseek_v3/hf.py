"""DeepSeek-V3 <-> Hugging Face: tensor names and config.json.

polytrain keeps HF's module names, so most tensors only gain a `model.` prefix. The differences:
- routed experts are stacked (see models/hf/names.py): the release has `model.layers.N.mlp.experts.E.gate_proj.weight`;
- MTP module k is `mtp.k.*` here and layer `num_hidden_layers + k` there, whose `shared_head.norm` is our
  `mtp.k.norm` and whose `embed_tokens` / `shared_head.head` are copies of the shared embedding / output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from polytrain.errors import ConfigError
from polytrain.models.deepseek_v3.config import DeepSeekV3Config
from polytrain.models.hf.config import rope_fields
from polytrain.models.hf.names import MTP, StackedExperts

EXPERT = re.compile(r"^(?:layers\.(\d+)|mtp\.(\d+)\.block)\.mlp\.experts\.(gate_up_proj|down_proj)$")
HF_MTP_COPY = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")


class V3Names(StackedExperts):
    EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: DeepSeekV3Config) -> None:
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




class V3Format:
    hf_class = "DeepseekV3ForCausalLM"
    hf_reward_class = "DeepseekV3ForSequenceClassification"
    keys = ("first_k_dense_replace", "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
            "attention_bias", "n_group", "topk_group", "aux_loss_alpha", "rope_interleave")

    def names(self, config: DeepSeekV3Config) -> V3Names:
        return V3Names(config)

    def read_config(self, hf: dict[str, Any], values: dict[str, Any], where: str) -> None:
        values.update(rope_fields(hf, where))
        heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads", hf.get("num_attention_heads"))
        if kv_heads != heads:
            raise ConfigError(f"MLA needs num_key_value_heads == num_attention_heads ({kv_heads} != {heads})")
        if hf.get("topk_method") not in (None, "noaux_tc", "group_limited_greedy", "greedy"):
            raise ConfigError(f"topk_method `{hf['topk_method']}` is not supported")
        if hf.get("topk_method") == "greedy":
            values["n_group"], values["topk_group"] = 1, 1

    def write_config(self, config: DeepSeekV3Config, out: dict[str, Any]) -> None:
        out["num_key_value_heads"] = config.num_attention_heads
        if config.rope_scaling == "yarn" and config.yarn_attention_factor:
            out["rope_scaling"]["attention_factor"] = config.yarn_attention_factor
