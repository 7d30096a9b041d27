"""Starting weights of a run: a Hugging Face checkpoint directory, or another polytrain run's newest checkpoint
(e.g. DPO or GRPO after SFT). Loaded into the unsharded model before the parallel layout is applied."""

from __future__ import annotations

import time
from typing import Any

from torch import nn


def load_initial_weights(init: Any, model: nn.Module) -> str:
    """Load `init.hf_path` or `init.from_run` into `model`; returns a line to print ('' when neither is set)."""
    started = time.perf_counter()
    skip = tuple(getattr(model, "extra_parameters", ()))  # e.g. a reward head that the source does not have
    if init.hf_path:
        from polytrain.models.hf.checkpoint import HFCheckpoint, load_hf_weights

        stats = load_hf_weights(model, HFCheckpoint(init.hf_path), skip=skip)
        return f"loaded {stats['tensors']} tensors from {init.hf_path} in {time.perf_counter() - started:.1f} s"
    if init.from_run:
        from polytrain.config import read_run_config
        from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint

        source = read_run_config(init.from_run, "init.from_run")
        path = latest_checkpoint(checkpoint_root(init.from_run, source.checkpoint.dir))
        if path is None:
            from polytrain.errors import CheckpointError

            raise CheckpointError(f"init.from_run: {init.from_run} has no checkpoint")
        step = load_checkpoint(path, model, skip=skip)["step"]
        return f"started from {path} (step {step} of {init.from_run}) in {time.perf_counter() - started:.1f} s"
    return ""
