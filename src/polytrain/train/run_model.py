"""The trained model of a run directory: its resolved config and a chosen (default: newest) checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from polytrain.config import JobConfig, build_config, read_toml
from polytrain.errors import CheckpointError, RunDirError
from polytrain.models.transformer import CausalLM, build_model
from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, step_dir
from polytrain.train.run_dir import CONFIG_FILE


def run_config(run_dir: str | Path) -> JobConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a polytrain run directory ({CONFIG_FILE} missing)")
    return build_config(read_toml(run_dir / CONFIG_FILE))


def load_run_model(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    step: int | None = None,
) -> tuple[JobConfig, CausalLM, int]:
    """(config, model with the checkpoint's weights, its step). `checkpoint` is a directory; `step` picks
    run_dir/checkpoints/step_N; neither means the newest."""
    config = run_config(run_dir)
    root = checkpoint_root(run_dir, config.checkpoint.dir)
    if checkpoint is not None:
        path = Path(checkpoint)
    elif step is not None:
        path = step_dir(root, step)
        if not path.is_dir():
            raise CheckpointError(f"{run_dir} has no checkpoint for step {step}")
    else:
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet (train first, or pass --checkpoint)")
    model = build_model(config.model, device, seed=None)
    loaded_step = load_checkpoint(path, model)["step"]
    model.eval()
    return config, model, loaded_step
