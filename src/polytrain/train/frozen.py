"""Frozen models next to the policy: the reference of preference and RL losses (the run's starting weights) and
other runs' models (distillation teachers), laid out like the policy, without gradients, in eval mode. Like the
policy, each is built on the meta device and only this rank's shards are allocated and loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from polytrain.config import JobConfig, read_run_config
from polytrain.errors import CheckpointError, ConfigError
from polytrain.models.registry import build_model
from polytrain.parallel.plan import apply_parallelism
from polytrain.parallel.runtime import ParallelRuntime
from polytrain.parallel.shards import materialize, tensors_to_initialise
from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint
from polytrain.train.init_weights import load_initial_weights


def frozen_layout(model: nn.Module, config: JobConfig, runtime: ParallelRuntime, device: torch.device,
                  seed: int | None, only: tuple[str, ...] | None = None) -> nn.Module:
    """`model` (on the meta device) sharded with the run's layout (no recomputation, no offload), allocated on
    `device` (initialised from `seed`, or left for loading), without gradients, in eval mode."""
    if runtime.dims.pp > 1:
        raise ConfigError("frozen reference / teacher models do not run under pipeline parallelism yet: set "
                          "parallel.pp = 1")
    for param in model.parameters():
        param.requires_grad_(False)
    layout = replace(config.parallel, activation_checkpointing="none", cpu_offload=False)
    # laying out a meta skeleton, as for the policy, outside any dispatch mode: under a dry run's fake tensors and
    # observer, DeviceMesh's lookup of this rank's coordinates would read placeholders (and shard it to nothing)
    with _disable_current_modes():
        sharded, _ = apply_parallelism(model, runtime.meshes, layout, device=device)
    materialize(sharded, model, device, seed, only)
    return sharded.eval()


def reference_model(config: JobConfig, runtime: ParallelRuntime, device: torch.device) -> nn.Module:
    """A frozen copy of the run's starting model (init.hf_path / init.from_run, or the seeded initialisation).
    Rebuilt from the source on resume, so it never drifts."""
    model = build_model(config.model, "meta")
    only = tensors_to_initialise(model, bool(config.init.hf_path or config.init.from_run), resumes=False)
    sharded = frozen_layout(model, config, runtime, device, config.run.seed, only)
    load_initial_weights(config.init, sharded, model, runtime.all_agree)
    return sharded


def frozen_run_model(run_dir: str, config: JobConfig, runtime: ParallelRuntime,
                     device: torch.device) -> tuple[JobConfig, nn.Module, int]:
    """(its config, the frozen model, its step) of another run's newest checkpoint."""
    run_config = read_run_config(run_dir)
    path = latest_checkpoint(checkpoint_root(run_dir, run_config.checkpoint.dir))
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    sharded = frozen_layout(build_model(run_config.model, "meta"), config, runtime, device, seed=None)
    step = load_checkpoint(Path(path), sharded)["step"]
    return run_config, sharded, step
