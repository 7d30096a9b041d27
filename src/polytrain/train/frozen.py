"""Frozen models next to the policy: the reference of preference and RL losses (the run's starting weights) and
other runs' models (distillation teachers), laid out like the policy, without gradients, in eval mode."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from polytrain.config import JobConfig
from polytrain.errors import ConfigError
from polytrain.models.registry import build_model
from polytrain.parallel.plan import apply_parallelism
from polytrain.parallel.runtime import ParallelRuntime
from polytrain.train.init_weights import load_initial_weights
from polytrain.train.run_model import load_run_model


def freeze(model: nn.Module, config: JobConfig, runtime: ParallelRuntime, device: torch.device) -> nn.Module:
    """`model` without gradients, sharded with the run's layout (no recomputation, no offload), in eval mode."""
    if runtime.dims.pp > 1:
        raise ConfigError("frozen reference / teacher models do not run under pipeline parallelism yet: set "
                          "parallel.pp = 1")
    for param in model.parameters():
        param.requires_grad_(False)
    layout = replace(config.parallel, activation_checkpointing="none", cpu_offload=False)
    model, _ = apply_parallelism(model, runtime.meshes, layout, device=device)
    return model.eval()


def reference_model(config: JobConfig, runtime: ParallelRuntime, device: torch.device) -> nn.Module:
    """A frozen copy of the run's starting model (init.hf_path / init.from_run, or the seeded initialisation).
    Rebuilt from the source on resume, so it never drifts."""
    model = build_model(config.model, device, seed=config.run.seed)
    load_initial_weights(config.init, model)
    return freeze(model, config, runtime, device)


def frozen_run_model(run_dir: str, config: JobConfig, runtime: ParallelRuntime,
                     device: torch.device) -> tuple[JobConfig, nn.Module, int]:
    """(its config, the frozen model, its step) of another run's newest checkpoint."""
    run_config, model, step = load_run_model(run_dir, device)
    return run_config, freeze(model, config, runtime, device), step
