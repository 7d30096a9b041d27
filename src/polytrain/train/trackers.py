"""Experiment trackers besides TensorBoard: Weights & Biases and SwanLab, chosen with `[log] trackers = [...]` and
imported only when chosen.

Each run directory keeps the tracker's run id (`trackers.json`), so a resumed run (--resume, a torchrun restart)
continues the same tracker run instead of starting a second one. Where the tracker sends its data (cloud, a
self-hosted server, offline files) is the tracker's own setting (`WANDB_MODE`, `wandb login`, `SWANLAB_MODE`,
`swanlab login`), untouched here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import secrets
import string
from pathlib import Path
from typing import Any, Protocol

from polytrain.errors import ConfigError

TRACKERS = ("wandb", "swanlab")
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: list[str]) -> None:
    """Fail at start-up, not after the model is built, when a chosen tracker's package is missing."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"`log.trackers` includes {name!r}, but the {name} package is not installed "
                              f"(pip install {name}), or remove it from `log.trackers`")


def _run_id(run_dir: Path, name: str, length: int) -> str:
    """This run's id at tracker `name`, made once and kept in the run directory."""
    path = run_dir / IDS_FILE
    ids: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    if name not in ids:
        ids[name] = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))
        path.write_text(json.dumps(ids, indent=2) + "\n")
    return ids[name]


class WandbTracker:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        self._run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                               id=_run_id(run_dir, "wandb", 16), resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class SwanLabTracker:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        self._swanlab = importlib.import_module("swanlab")
        logdir = run_dir / "swanlog"
        logdir.mkdir(exist_ok=True)
        # SwanLab run ids are 21 characters
        self._swanlab.init(project=project, experiment_name=run_dir.name, config=config, logdir=str(logdir),
                           id=_run_id(run_dir, "swanlab", 21), resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self._swanlab.log(values, step=step)

    def close(self) -> None:
        self._swanlab.finish()


def open_trackers(names: list[str], run_dir: Path, project: str, config: dict[str, Any]) -> list[Tracker]:
    classes = {"wandb": WandbTracker, "swanlab": SwanLabTracker}
    return [classes[name](run_dir, project, config) for name in names]
