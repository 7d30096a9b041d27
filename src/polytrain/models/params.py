"""Parameter counts by component, total and activated per token, computed on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from polytrain.models.common.config import ModelConfig
from polytrain.models.registry import build_model

COMPONENTS = ("embedding", "attention", "dense_mlp", "router", "shared_experts", "routed_experts",
              "hyper_connections", "norms", "output_head")

# Published totals (main model, MTP excluded) and activated parameters per token, with their source.
PUBLISHED = {
    "deepseek-v3-671b": (671e9, 37e9, "DeepSeek-V3 README_WEIGHTS.md: 671B, 37B activated"),
    "deepseek-v4-flash": (284e9, 13e9, "DeepSeek-V4-Flash model card: 284B, 13B activated"),
    "deepseek-v4-pro": (1.6e12, 49e9, "DeepSeek-V4-Pro model card: ~1.6T, 49B activated"),
}


def components(model: nn.Module) -> dict[str, str]:
    """Parameter name -> component. A module whose class (or instance) sets `component` claims every parameter
    under it, the outermost claim winning (a norm inside attention counts as attention); the embedding and
    anything unclaimed take their own names."""
    out: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str, claim: str | None) -> None:
        if claim is None:
            claim = "embedding" if isinstance(module, nn.Embedding) else getattr(module, "component", None)
        for name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            out[prefix + name] = claim or "other"
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.", claim)

    visit(model, "", None)
    return out


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
    component_of = components(model)
    routed_share = config.num_experts_per_tok / config.n_routed_experts
    total: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    active: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    mtp_total = mtp_active = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied embedding / head
            continue
        seen.add(id(param))
        component = component_of[name]
        used = round(param.numel() * routed_share) if component == "routed_experts" else param.numel()
        if name.startswith("mtp."):
            mtp_total += param.numel()
            mtp_active += used
            continue
        total[component] = total.get(component, 0) + param.numel()
        active[component] = active.get(component, 0) + used
    return ParameterCount(total, active, mtp_total, mtp_active)
