"""Parameter counts by component, total and activated per token, computed on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import dataclass

from polytrain.models.config import ModelConfig
from polytrain.models.transformer import build_model

COMPONENTS = ("embedding", "attention", "dense_mlp", "router", "shared_experts", "routed_experts",
              "hyper_connections", "norms", "output_head")

# Published totals (main model, MTP excluded) and activated parameters per token, with their source.
PUBLISHED = {
    "deepseek-v3-671b": (671e9, 37e9, "DeepSeek-V3 README_WEIGHTS.md: 671B, 37B activated"),
    "deepseek-v4-flash": (284e9, 13e9, "DeepSeek-V4-Flash model card: 284B, 13B activated"),
    "deepseek-v4-pro": (1.6e12, 49e9, "DeepSeek-V4-Pro model card: ~1.6T, 49B activated"),
}


def component_of(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "output_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if "_hc." in name or name.startswith("hc_head."):
        return "hyper_connections"
    if ".mlp." in name:
        return "dense_mlp"
    if "norm" in name:
        return "norms"
    return "other"


@dataclass
class ParameterCount:
    total: dict[str, int]
    active: dict[str, int]
    mtp_total: int
    mtp_active: int

    @property
    def main_total(self) -> int:
        return sum(self.total.values())

    @property
    def main_active(self) -> int:
        return sum(self.active.values())


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Main-model parameters by component (MTP modules counted apart, as the DeepSeek reports do); activated =
    what one token uses: everything but the routed experts it is not sent to."""
    model = build_model(config, "meta")
    routed_share = config.num_experts_per_tok / config.n_routed_experts
    total: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    active: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    mtp_total = mtp_active = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied embedding / head
            continue
        seen.add(id(param))
        component = component_of(name)
        used = round(param.numel() * routed_share) if component == "routed_experts" else param.numel()
        if name.startswith("mtp."):
            mtp_total += param.numel()
            mtp_active += used
            continue
        total[component] = total.get(component, 0) + param.numel()
        active[component] = active.get(component, 0) + used
    return ParameterCount(total, active, mtp_total, mtp_active)
