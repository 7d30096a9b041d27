"""Starting weights of a run: a Hugging Face checkpoint directory, or another polytrain run's newest checkpoint
(e.g. DPO or GRPO after SFT). Loaded into the model once it is laid out: every rank reads only what it holds (the
safetensors slices of its shards; DCP reshards a run's checkpoint)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import nn

from polytrain.errors import CheckpointError
from polytrain.parallel.shards import local_indices


def load_initial_weights(init: Any, model: nn.Module, full_model: nn.Module | None = None,
                         agree: Callable[[bool], bool] | None = None) -> str:
    """Load `init.hf_path` or `init.from_run` into `model` (laid out, possibly only this rank's pipeline stages of
    `full_model`); returns a line to print ('' when neither is set). Each rank reads its own part, so a missing
    or damaged tensor may fail on some ranks only: with `agree` (all ranks' verdict), every rank raises."""
    try:
        message = _load(init, model, full_model)
    except Exception:  # tell the other ranks, then report this rank's own error
        if agree is not None:
            agree(False)
        raise
    if agree is not None and not agree(True):
        raise CheckpointError("loading the starting weights failed on another rank (its error names the tensor)")
    return message


def _load(init: Any, model: nn.Module, full_model: nn.Module | None) -> str:
    started = time.perf_counter()
    owner = full_model or model
    skip = tuple(getattr(owner, "extra_parameters", ()))  # e.g. a reward head that the source does not have
    if init.hf_path:
        from polytrain.models.hf.checkpoint import HFCheckpoint, load_hf_weights

        stats = load_hf_weights(model, HFCheckpoint(init.hf_path), skip=skip, local_indices=local_indices,
                                full_model=full_model)
        return f"loaded {stats['tensors']} tensors from {init.hf_path} in {time.perf_counter() - started:.1f} s"
    if init.from_run:
        from polytrain.config import read_run_config
        from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint

        source = read_run_config(init.from_run, "init.from_run")
        path = latest_checkpoint(checkpoint_root(init.from_run, source.checkpoint.dir))
        if path is None:
            raise CheckpointError(f"init.from_run: {init.from_run} has no checkpoint")
        step = load_checkpoint(path, model, skip=skip)["step"]
        return f"started from {path} (step {step} of {init.from_run}) in {time.perf_counter() - started:.1f} s"
    return ""
