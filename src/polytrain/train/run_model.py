"""The trained model of a run directory: its resolved config and a chosen (default: newest) checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from polytrain.config import JobConfig, read_run_config
from polytrain.errors import CheckpointError
from polytrain.models.common.decoder import DecoderLM
from polytrain.models.registry import build_model
from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, step_dir


def load_run_model(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    step: int | None = None,
) -> tuple[JobConfig, DecoderLM, int]:
    """(config, model with the checkpoint's weights, its step). `checkpoint` is a directory; `step` picks
    run_dir/checkpoints/step_N; neither means the newest."""
    config = read_run_config(run_dir)
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
