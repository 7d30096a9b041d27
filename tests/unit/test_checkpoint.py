"""Checkpoints: exact round trip, atomic commit, incomplete ones refused, keep-last pruning; run-dir safety."""

from __future__ import annotations

import json

import pytest
import torch

from polytrain.config import build_config, config_to_toml
from polytrain.errors import CheckpointError, RunDirError
from polytrain.models import build_model, preset
from polytrain.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from polytrain.train.optim import build_optimizer
from polytrain.train.run_dir import prepare_run_dir


def trained_model(seed: int = 0):
    model = build_model(preset("tiny"), "cpu", seed=seed)
    config = build_config({"data": {"train_path": "x", "tokenizer": "y"}})
    optimizer = build_optimizer(model, config.train)
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer, config


def test_round_trip_restores_model_optimizer_and_state(tmp_path):
    model, optimizer, _config = trained_model()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 3, model, optimizer, {"loader": {"position": 96}}, {"cpu": rng}, keep_last=2)
    other, other_opt, _ = trained_model(seed=1)
    state = load_checkpoint(path, other, other_opt)
    assert state["step"] == 3 and state["loader"]["position"] == 96
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(state["rng"]["cpu"], rng)


def test_keep_last_prunes_old_checkpoints_and_tmp_dirs_are_invisible(tmp_path):
    model, optimizer, _ = trained_model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000009.tmp").mkdir()  # a save that crashed half way
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_truncated_checkpoint_is_refused(tmp_path):
    model, optimizer, _ = trained_model()
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, {}, keep_last=2)
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model, optimizer)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete polytrain checkpoint"):
        load_checkpoint(path, model)


def test_run_dir_refuses_to_mix_runs(tmp_path):
    config = build_config({"data": {"train_path": "x", "tokenizer": "y"}, "run": {"output_dir": str(tmp_path / "r")}})
    run_dir = prepare_run_dir(config, resume=False, overwrite=False)
    assert (run_dir / "config.toml").read_text() == config_to_toml(config)
    with pytest.raises(RunDirError, match="already holds a run: pass --resume"):
        prepare_run_dir(config, resume=False, overwrite=False)
    prepare_run_dir(config, resume=True, overwrite=False)  # same config: fine
    config.train.steps = 999  # extending a run is allowed
    prepare_run_dir(config, resume=True, overwrite=False)
    config.train.lr = 0.5
    with pytest.raises(RunDirError, match="differs from the run .* in train.lr"):
        prepare_run_dir(config, resume=True, overwrite=False)
    (run_dir / "marker").write_text("old")
    prepare_run_dir(config, resume=False, overwrite=True)
    assert not (run_dir / "marker").exists()


def test_run_dir_never_deletes_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text(json.dumps({"keep": True}))
    config = build_config({"data": {"train_path": "x", "tokenizer": "y"}, "run": {"output_dir": str(tmp_path)}})
    with pytest.raises(RunDirError, match="refusing to delete"):
        prepare_run_dir(config, resume=False, overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def save_steps(root, steps, keep_last=10, keep_every=0, **kwargs):
    from polytrain.train.checkpoint import Checkpointer

    model, optimizer, _ = trained_model()
    messages: list[str] = []
    checkpointer = Checkpointer(root, keep_last, keep_every, report=messages.append, **kwargs)
    results = [checkpointer.save(step, model, optimizer, {"loader": {"position": step}}, {}) for step in steps]
    return checkpointer, results, messages


def test_manifest_records_size_and_checksum_of_every_file(tmp_path):
    _checkpointer, _, _ = save_steps(tmp_path, [1])
    manifest = json.loads((tmp_path / "step_00000001" / "manifest.json").read_text())
    files = set(p.name for p in (tmp_path / "step_00000001").iterdir()) - {"manifest.json"}
    assert set(manifest["files"]) == files and {".metadata", "trainer_state.json"} <= files
    assert all(info["size"] > 0 for info in manifest["files"].values())
    # DCP's metadata grows with ranks x tensors: recorded by size (its loader validates its structure)
    assert all(len(info["crc32"]) == 8 for name, info in manifest["files"].items() if name != ".metadata")
    assert manifest["files"][".metadata"]["crc32"] is None


@pytest.mark.parametrize("damage", ["truncate", "bit_flip", "delete_manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    checkpointer, _, messages = save_steps(tmp_path, [1, 2])
    newest = tmp_path / "step_00000002"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:-10]))
    elif damage == "bit_flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    assert checkpointer.latest_valid().name == "step_00000001"
    if damage != "delete_manifest":  # without a manifest it was never committed: nothing to report
        assert any("step_00000002 is unusable" in m for m in messages)


def test_keep_last_plus_keep_every(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4, 5, 6, 7], keep_last=2, keep_every=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006", "step_00000007"]


def test_a_failing_save_leaves_previous_checkpoints_intact_and_reports_the_cause(tmp_path):
    import errno

    def disk_full(step: int) -> None:
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    _checkpointer, results, messages = save_steps(tmp_path, [1, 2, 3], during_save=disk_full)
    assert results == [True, False, True]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003"]
    assert not (tmp_path / "step_00000002.tmp").exists()
    assert any("step 2 FAILED" in m and "No space left on device" in m for m in messages)


def test_async_save_commits_when_the_write_finishes(tmp_path):
    checkpointer, results, _ = save_steps(tmp_path, [1], async_save=True)
    assert results == [True]
    assert checkpointer.wait()
    assert checkpointer.latest_valid().name == "step_00000001"
    model, optimizer, _ = trained_model(seed=5)
    assert load_checkpoint(tmp_path / "step_00000001", model, optimizer)["loader"]["position"] == 1


def test_an_output_dir_that_cannot_be_written_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    config = build_config({"data": {"train_path": "x", "tokenizer": "y"},
                           "run": {"output_dir": str(blocker / "run")}})
    with pytest.raises(RunDirError, match="a_file is a file, not a folder"):
        prepare_run_dir(config, resume=False, overwrite=False)
    config.run.output_dir = str(tmp_path / "locked" / "run")
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: False)  # root may write anywhere: ask as a user would
    with pytest.raises(RunDirError, match="locked cannot be written"):
        prepare_run_dir(config, resume=False, overwrite=False)
    assert not (tmp_path / "locked" / "run").exists()
