"""The frozen reference model of preference and RL losses: the starting weights, laid out like the policy."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from polytrain.models.transformer import build_model
from polytrain.parallel.plan import apply_parallelism
from polytrain.train.init_weights import load_initial_weights

if TYPE_CHECKING:
    from polytrain.train.trainer import Trainer


def build_reference(trainer: Trainer) -> nn.Module:
    """A copy of the run's starting model (init.hf_path / init.from_run, or the seeded initialisation), sharded
    with the run's layout, in eval mode, without gradients. Rebuilt from the source on resume, so it never drifts."""
    config = trainer.config
    model = build_model(config.model, trainer.device, seed=config.run.seed)
    load_initial_weights(config.init, model)
    for param in model.parameters():
        param.requires_grad_(False)
    layout = replace(config.parallel, activation_checkpointing="none", cpu_offload=False)
    model, _ = apply_parallelism(model, trainer.runtime.meshes, layout, device=trainer.device)
    return model.eval()

