"""Sharded checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout: run_dir/checkpoints/step_00000100/ holds the DCP shards of {"model", "optim"}, `trainer_state.json`
(step, data position, metrics state), one `rng_rank{r}.pt` per rank and, written last, `manifest.json` with every
file's size. A save goes to `step_X.tmp/` and is renamed into place only when complete, so a crash mid-save never
leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from polytrain.errors import CheckpointError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoints (those with a manifest), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _dcp_quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, no_dist=not dist.is_initialized(), **kwargs)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_state: dict[str, torch.Tensor],
    keep_last: int,
) -> Path:
    """Save and commit the checkpoint of `step`; then delete all but the newest `keep_last`."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    _dcp_quiet(dcp.save, {"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state, tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _check_manifest(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing or truncated")


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load model (and optimizer) state from `path`; returns the trainer state and this rank's RNG state."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a complete polytrain checkpoint (no {MANIFEST})")
    _check_manifest(path)
    if optimizer is None:
        state = {"model": model.state_dict()}
        _dcp_quiet(dcp.load, state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        _dcp_quiet(dcp.load, state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng_rank{_rank()}.pt"
    trainer_state["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return trainer_state
