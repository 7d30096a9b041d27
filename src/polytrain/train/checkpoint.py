"""Sharded checkpoints with torch.distributed.checkpoint (DCP), committed atomically and verified on resume.

Layout of one checkpoint, root/step_00000100/: the DCP shards of {"model", "optim"} (`__<rank>_<n>.distcp` and
`.metadata`), `trainer_state.json` (step, data position, guard and metrics state; the learning rate is a function
of the step), one `rng_rank<r>.pt` per rank and, written last, `manifest.json` with every file's size and CRC32 (DCP's
`.metadata`, which grows with ranks x tensors: its size).
A save goes to `step_X.tmp/` and is renamed into place only once every rank's files are written and checksummed, so
a crash or a full disk mid-save never leaves a checkpoint that looks valid, and never touches the previous ones.
Each rank checksums the files it wrote, and on resume each rank checks a 1 / world share of the files, so the cost
per rank does not grow with the world size.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from polytrain.errors import CheckpointError
from polytrain.parallel.fsdp import reshard_all

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


DCP_METADATA = ".metadata"


def _all_ok(ok: bool, device: torch.device | None = None) -> bool:
    """Whether every rank passes `ok` (the flag travels on `device`: the job's device, for its process group)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag) == 0


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.state_dict().values()), None)
    if tensor is None:
        return torch.device("cpu")
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).device


def checkpoint_root(run_dir: str | Path, directory: str = "") -> Path:
    return Path(directory) if directory else Path(run_dir) / CHECKPOINTS


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def crc32(path: Path) -> str:
    value = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _dcp_quiet(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, no_dist=not dist.is_initialized(), **kwargs)


def _my_files(directory: Path) -> list[Path]:
    rank = _rank()
    mine = [p for p in directory.iterdir() if p.name.startswith(f"__{rank}_") or p.name == f"rng_rank{rank}.pt"]
    if rank == 0:
        mine += [p for p in directory.iterdir() if p.name in (DCP_METADATA, TRAINER_STATE)]
    return mine


def problems(path: Path, check_sums: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a committed checkpoint (empty = valid). With `share` = (index, count), only every
    count-th file of the manifest from index is checked, so the ranks of a job split the work: O(files / ranks)
    stats and reads per rank, plus the manifest."""
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{manifest_file}: unreadable ({err})"]
    found = []
    for i, (name, info) in enumerate(sorted(manifest["files"].items())):
        if i % share[1] != share[0]:
            continue
        file = path / name
        if not file.is_file():
            found.append(f"{name} is missing")
        elif file.stat().st_size != info["size"]:
            found.append(f"{name} has {file.stat().st_size} bytes, the manifest says {info['size']}")
        elif check_sums and info["crc32"] is not None and crc32(file) != info["crc32"]:
            found.append(f"{name} fails its checksum (corrupted)")
    return found


class Checkpointer:
    """Saves (synchronously or in the background), commits, prunes and finds valid checkpoints."""

    def __init__(self, root: Path, keep_last: int, keep_every: int = 0, async_save: bool = False,
                 report: Callable[[str], None] = print, before_commit: Callable[[int], None] = lambda step: None,
                 during_save: Callable[[int], None] = lambda step: None, device: torch.device | None = None) -> None:
        self.root = root
        self.device = device
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.report = report
        self.before_commit = before_commit
        self.during_save = during_save
        self._pending: tuple[int, Path, Future] | None = None
        # thread-mode async save needs a process group of its own (sharing the default one breaks gloo)
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
             rng_state: dict[str, torch.Tensor]) -> bool:
        """Start (async) or complete (sync) the checkpoint of `step`. False, with the cause reported, if the
        storage failed; the previous checkpoints are untouched either way."""
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        ok = True
        cause = ""
        try:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            _barrier()
            self.during_save(step)
            reshard_all(model)  # a forward after the last backward leaves the root unsharded
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            torch.save(rng_state, tmp / f"rng_rank{_rank()}.pt")
            if _rank() == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
            if self.async_save:
                future = _dcp_quiet(dcp.async_save, state, checkpoint_id=str(tmp), process_group=self._group)
                self._pending = (step, tmp, future)
                return True
            _dcp_quiet(dcp.save, state, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            ok, cause = False, self._cause(err)
        return self._commit(step, tmp, ok, cause)

    def _cause(self, err: BaseException) -> str:
        """The error, with the free space left where checkpoints go (a full disk often surfaces as an opaque
        serialization error)."""
        if isinstance(err, CheckpointException) and err.failures:  # unwrap the first rank's own error
            failure = next(iter(err.failures.values()))
            err = failure[0] if isinstance(failure, tuple) else failure
        text = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        try:
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free / 2**20
            text += f"; free space on {self.root}: {free:.0f} MiB"
        except OSError:
            pass
        return text

    def poll(self) -> None:
        """Commit a background save once every rank's write has finished (call once per step, on every rank)."""
        if self.async_save and _all_ok(self._pending is None or self._pending[2].done(), self.device) and self._pending:
            self.wait()

    def wait(self) -> bool:
        """Finish and commit a pending background save (True if there was none or it succeeded)."""
        if self._pending is None:
            return True
        step, tmp, future = self._pending
        self._pending = None
        ok, cause = True, ""
        try:
            future.result()
        except (Exception, CheckpointException) as err:
            ok, cause = False, self._cause(err)
        return self._commit(step, tmp, ok, cause)

    def close(self) -> None:
        """End of the run: a background save still pending is abandoned uncommitted (its `.tmp` directory is never
        loaded), then the save's own process group goes, before the default group it was split from. A gloo group
        left to interpreter shutdown can abort the process ("terminate called without an active exception")."""
        if self._pending is not None:
            self._pending[2].exception()  # wait for the writer thread: it is using the group
            self._pending = None
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None

    def _commit(self, step: int, tmp: Path, ok: bool, cause: str) -> bool:
        final = step_dir(self.root, step)
        sums: dict[str, dict[str, Any]] = {}
        if ok:
            try:  # each rank sums its own files; DCP's .metadata (ranks x tensors entries) is checked by size
                sums = {p.name: {"size": p.stat().st_size, "crc32": None if p.name == DCP_METADATA else crc32(p)}
                        for p in _my_files(tmp)}
            except OSError as err:
                ok, cause = False, f"{type(err).__name__}: {err}"
        if not _all_ok(ok, self.device):
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self.report(f"checkpoint of step {step} FAILED and was discarded ({cause or 'failed on another rank'}); "
                        f"the previous checkpoints in {self.root} are intact")
            return False
        gathered = [None] * _world()
        if dist.is_initialized():
            dist.all_gather_object(gathered, sums)
        else:
            gathered = [sums]
        self.before_commit(step)
        committed = True
        if _rank() == 0:
            files = {name: info for part in gathered for name, info in part.items()}
            try:
                (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                self.report(f"checkpoint of step {step} FAILED at commit ({type(err).__name__}: {err}); previous "
                            "checkpoints are intact")
                committed = False
            if committed:
                self._prune()
        return _all_ok(committed, self.device)

    def _prune(self) -> None:
        found = list_checkpoints(self.root)
        for old in found[: -self.keep_last]:
            step = int(old.name.split("_")[1])
            if self.keep_every and step % self.keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ loading
    def latest_valid(self, check_sums: bool = True) -> Path | None:
        """The newest checkpoint that passes verification (every rank reads a share of the files); newer broken
        ones are reported and skipped."""
        for path in reversed(list_checkpoints(self.root)):
            found = problems(path, check_sums, (_rank(), _world()))
            if _all_ok(not found, self.device):
                return path
            self.report(f"checkpoint {path.name} is unusable ({'; '.join(found) or 'failed on another rank'}); "
                        "falling back to the previous one")
        return None


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load model (and optimizer) state from `path`; returns the trainer state and this rank's RNG state (None when
    the checkpoint was written by fewer ranks)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a complete polytrain checkpoint (no {MANIFEST})")
    found = problems(path, check_sums=False, share=(_rank(), _world()))
    if not _all_ok(not found, _device_of(model)):
        raise CheckpointError(f"checkpoint {path} is incomplete: {'; '.join(found) or 'see the other ranks'}")
    if optimizer is None:
        state = {"model": {k: v for k, v in model.state_dict().items() if k not in skip}}
        _dcp_quiet(dcp.load, state, checkpoint_id=str(path))
        model.load_state_dict(state["model"], strict=not skip)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        _dcp_quiet(dcp.load, state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng_rank{_rank()}.pt"
    trainer_state["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return trainer_state


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng_state: dict[str, torch.Tensor], keep_last: int) -> Path:
    """Synchronous save and commit (raises CheckpointError if it fails)."""
    if not Checkpointer(Path(root), keep_last, report=lambda message: None).save(
            step, model, optimizer, trainer_state, rng_state):
        raise CheckpointError(f"saving the checkpoint of step {step} under {root} failed")
    return step_dir(root, step)
