"""Experiment trackers (`[log] trackers`): W&B and SwanLab get the same records as metrics.jsonl, a resumed run
continues the same tracker run, and a tracker whose package is missing stops the job before anything is built.

The tracker packages are stood in for by modules with the signatures of their documented APIs (wandb.init(project,
name, dir, config, id, resume) -> run with log(data, step) / finish(); swanlab.init(project, experiment_name,
config, logdir, id, resume), swanlab.log(data, step), swanlab.finish()): a wrong keyword fails the test."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from polytrain.config import build_config
from polytrain.errors import ConfigError
from tests.conftest import EXAMPLES, TOKENIZER


class FakeWandb:
    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def module(self) -> types.ModuleType:
        tracker = self

        class Run:
            def log(self, data, step=None, commit=None):
                tracker.logged.append((dict(data), step))

            def finish(self, exit_code=None, quiet=None):
                tracker.finished += 1

        def init(entity=None, project=None, dir=None, id=None, name=None, notes=None, tags=None, config=None,
                 resume=None, mode=None):
            tracker.inits.append({"project": project, "dir": dir, "id": id, "name": name, "config": config,
                                  "resume": resume})
            return Run()

        module = types.ModuleType("wandb")
        module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        module.init = init
        return module


class FakeSwanlab(FakeWandb):
    def module(self) -> types.ModuleType:
        tracker = self

        def init(project=None, workspace=None, experiment_name=None, description=None, config=None, logdir=None,
                 mode=None, id=None, resume=None):
            tracker.inits.append({"project": project, "logdir": logdir, "id": id, "name": experiment_name,
                                  "config": config, "resume": resume})

        def log(data, step=None, print_to_console=False):
            tracker.logged.append((dict(data), step))

        def finish(state="success", error=None):
            tracker.finished += 1

        module = types.ModuleType("swanlab")
        module.__spec__ = importlib.machinery.ModuleSpec("swanlab", None)
        module.init, module.log, module.finish = init, log, finish
        return module


def job(run_dir, steps: int, trackers: list[str]):
    data = run_dir.parent / "train.jsonl"
    if not data.is_file():
        data.write_text("".join((EXAMPLES / "data" / "train.jsonl").read_text().splitlines(True)[:16]))
    return build_config({
        "run": {"output_dir": str(run_dir)},
        "model": {"preset": "tiny", "num_hidden_layers": 1},
        "data": {"train_path": str(data), "tokenizer": str(TOKENIZER),
                 "max_seq_len": 32},
        "train": {"steps": steps, "global_batch_size": 2, "micro_batch_size": 2, "warmup_steps": 1},
        "checkpoint": {"every": 2, "async_save": False},
        "log": {"trackers": trackers, "project": "demo", "tensorboard": False},
    })


def test_trackers_get_every_record_and_a_resumed_run_continues_the_same_tracker_run(tmp_path, monkeypatch):
    from polytrain.train.trainer import Trainer

    wandb, swanlab = FakeWandb(), FakeSwanlab()
    monkeypatch.setitem(sys.modules, "wandb", wandb.module())
    monkeypatch.setitem(sys.modules, "swanlab", swanlab.module())
    run = tmp_path / "run"
    Trainer(job(run, 2, ["wandb", "swanlab"]), overwrite=True).run()
    Trainer(job(run, 4, ["wandb", "swanlab"]), resume=True).run()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tracker in (wandb, swanlab):
        assert [i["project"] for i in tracker.inits] == ["demo", "demo"]
        assert [i["name"] for i in tracker.inits] == ["run", "run"]
        assert tracker.inits[0]["id"] == tracker.inits[1]["id"] and tracker.inits[0]["resume"] == "allow"
        assert tracker.inits[0]["config"]["train"]["global_batch_size"] == 2
        assert tracker.finished == 2
        trained = [(data, step) for data, step in tracker.logged if "train/loss" in data]
        assert [step for _, step in trained] == [1, 2, 3, 4]
        assert [data["train/loss"] for data, _ in trained] == [r["loss"] for r in records if "loss" in r]
    assert len(swanlab.inits[0]["id"]) == 21
    assert wandb.inits[0]["dir"] == str(run)
    assert set(json.loads((run / "trackers.json").read_text())) == {"wandb", "swanlab"}


def test_a_tracker_that_is_not_installed_stops_the_job_before_it_builds(tmp_path, monkeypatch):
    from polytrain.train.trainer import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds nothing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match=r"`log.trackers` includes 'wandb', but the wandb package is not installed"):
        Trainer(job(tmp_path / "run", 2, ["wandb"]), overwrite=True)
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_is_a_config_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"`log.trackers\[0\]` must be one of wandb, swanlab, got 'wandbb'.*wandb"):
        job(tmp_path, 2, ["wandbb"])
