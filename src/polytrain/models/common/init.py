"""Weight initialisation of the shared building blocks (each family's `init_weights` adds its own modules)."""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models.common.layers import RMSNorm
from polytrain.models.common.moe import GroupedExperts, HashRouter, Router


def generator_for(device: torch.device, seed: int | None) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


@torch.no_grad()
def init_shared(module: nn.Module, std: float, generator: torch.Generator | None) -> bool:
    """Initialise `module` if it is a shared block: normal(0, std) matrices and router weights, zero biases and
    router correction biases, ones for norms, a random expert table for hash routers. Returns whether it was one."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std, generator=generator)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, Router):
        module.weight.normal_(0.0, std, generator=generator)
        module.e_score_correction_bias.zero_()
    elif isinstance(module, HashRouter):
        module.weight.normal_(0.0, std, generator=generator)
        cfg = module.config
        scores = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=generator, device=module.weight.device)
        module.tid2eid.copy_(scores.argsort(dim=-1)[:, : cfg.num_experts_per_tok])
    elif isinstance(module, GroupedExperts):
        module.gate_up_proj.normal_(0.0, std, generator=generator)
        module.down_proj.normal_(0.0, std, generator=generator)
    else:
        return False
    return True
