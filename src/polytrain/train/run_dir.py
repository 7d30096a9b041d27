"""The run directory: refuse to mix two different runs in one directory, resume only a matching run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from polytrain.config import JobConfig, config_to_toml, read_toml
from polytrain.errors import RunDirError
from polytrain.schema import to_dict

CONFIG_FILE = "config.toml"

# Keys a resumed run may change: how long it trains and how it logs, not what it trains.
RESUMABLE_CHANGES = (
    "train.steps",
    "eval.every",
    "eval.max_batches",
    "checkpoint.every",
    "checkpoint.keep_last",
    "log.",
    "guard.",
    "watchdog.",
    "checkpoint.async_save",
    "checkpoint.verify_on_resume",
    "run.device",
    "parallel.",  # the layout may change on resume: checkpoints reshard
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, excluding RESUMABLE_CHANGES."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]


def prepare_run_dir(config: JobConfig, resume: bool, overwrite: bool) -> Path:
    """Create or validate run.output_dir and write the resolved config (one process). Returns the directory."""
    check_run_dir(config, resume, overwrite)
    return write_run_dir(config, overwrite)


def _check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest existing folder above it, can be written."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise RunDirError(f"run.output_dir {run_dir}: {existing} is a file, not a folder")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run.output_dir {run_dir}: {existing} cannot be written (permission denied)")


def write_run_dir(config: JobConfig, overwrite: bool) -> Path:
    """After `check_run_dir` passed: clear the old run when overwriting, write the resolved config."""
    run_dir = Path(config.run.output_dir)
    config_file = run_dir / CONFIG_FILE
    try:
        if overwrite and config_file.is_file():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(config_to_toml(config))
    except OSError as err:  # a full disk, a read-only mount: one line, not a traceback
        raise RunDirError(f"run.output_dir {run_dir}: cannot write ({err.strerror or err})") from None
    return run_dir


def check_run_dir(config: JobConfig, resume: bool, overwrite: bool, must_hold_a_run: bool = False) -> None:
    """Refuse a run directory whose use would lose or mix work (read-only; safe on every rank). `must_hold_a_run`
    (--resume): refuse a directory that holds no run (a mistyped path must not start a new one)."""
    run_dir = Path(config.run.output_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    config_file = run_dir / CONFIG_FILE
    _check_writable(run_dir)
    if must_hold_a_run and not config_file.is_file():
        raise RunDirError(f"--resume: {run_dir} holds no polytrain run ({CONFIG_FILE} missing): check "
                          "run.output_dir, or drop --resume to start a new run")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.output_dir {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if overwrite:
            if not config_file.is_file():
                raise RunDirError(
                    f"{run_dir} is not empty and holds no polytrain run ({CONFIG_FILE} missing): refusing to delete it"
                )
        elif not config_file.is_file():
            raise RunDirError(f"{run_dir} is not empty and holds no polytrain run: choose another run.output_dir")
        elif not resume:
            raise RunDirError(
                f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                "or set run.output_dir to a new directory"
            )
        else:
            changed = config_differences(read_toml(config_file), to_dict(config))
            if changed:
                raise RunDirError(
                    f"--resume: the config differs from the run in {run_dir} in {', '.join(changed)}; "
                    "resume with the same settings (only train.steps, eval/checkpoint/log cadence and the device may "
                    "change) or start a new run"
                )
