"""Fault injection: every promise of the resilience layer is exercised by breaking something on purpose.

Faults come from POLYTRAIN_FAULTS (see polytrain/train/faults.py); a fault fires only in a job's first attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed.harness import assert_parity, final_state, losses, metric, run, write_job

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(job: Path, out: Path, *overrides: str, faults: str = "", restarts: int = 0, timeout: int = 300):
    args = [*TORCHRUN, "--max-restarts", str(restarts), "-m", "polytrain", "sft", str(job), "--resume-or-start",
            "--set", f'run.output_dir="{out}"', "--set", "parallel.collective_timeout_s=60",
            *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTRAIN_FAULTS": faults}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_final_parameters(a: Path, b: Path, atol: float = 0.0) -> None:
    sa, sb = final_state(a), final_state(b)
    for name in sa:
        assert float((sa[name] - sb[name]).abs().max()) <= atol, name


@pytest.fixture(scope="module")
def job6(tmp_path_factory):
    """6 steps, a checkpoint every 2, and the uninterrupted 2-rank torchrun run to compare with."""
    root = tmp_path_factory.mktemp("job6")
    job = write_job(root, extra="")
    job.write_text(job.read_text().replace("steps = 5", "steps = 6").replace("every = 0", "every = 2"))
    result = torchrun(job, root / "clean")
    assert result.returncode == 0, result.stderr[-3000:]
    return job, root / "clean"


@pytest.mark.parametrize("fault", ["kill@3:rank=1", "kill_in_save@4:rank=0"], ids=["mid_step", "mid_save"])
def test_killed_rank_restarts_under_torchrun_and_ends_bit_identical(job6, tmp_path, fault):
    job, clean = job6
    result = torchrun(job, tmp_path / "faulty", faults=fault, restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert_same_final_parameters(clean, tmp_path / "faulty")
    steps = [json.loads(line)["step"] for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 7))  # nothing lost, nothing repeated in the record


def test_resume_on_fewer_ranks_and_without_expert_parallelism(reference, tmp_path):
    job, single = reference
    # 4 ranks (dp_shard=4) for 3 steps, then 2 ranks (dp_shard=2)
    run(job, tmp_path / "moved", 4, flags=("--stop-at-step", "3"))
    run(job, tmp_path / "moved", 2, flags=("--resume",))
    assert_parity(single, tmp_path / "moved")
    # ep=2 on 2 ranks, then ep=1 on 1 rank
    run(job, tmp_path / "ep", 2, "parallel.ep=2", flags=("--stop-at-step", "2"))
    run(job, tmp_path / "ep", 1, flags=("--resume",))
    assert_parity(single, tmp_path / "ep")


def test_async_checkpoints_give_the_same_run(tmp_path):
    job = write_job(tmp_path)
    run(job, tmp_path / "sync", 2, "checkpoint.every=2")
    run(job, tmp_path / "async", 2, "checkpoint.every=2", "checkpoint.async_save=true")
    assert_same_final_parameters(tmp_path / "sync", tmp_path / "async")  # both loaded into one process (DCP reshards)
    assert final_state(tmp_path / "sync")["embed_tokens.weight"].shape[0] == 128  # whole, not rank 0's shard
    manifest = json.loads((tmp_path / "async" / "checkpoints" / "step_00000005" / "manifest.json").read_text())
    assert any(name.startswith("__1_") for name in manifest["files"])  # rank 1's shards are in the manifest


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_nan_batch_is_skipped_or_rolled_back_and_the_run_completes(tmp_path, action):
    job = write_job(tmp_path)
    out = tmp_path / action
    run(job, out, 2, "checkpoint.every=2", f'guard.action="{action}"', extra_env={"POLYTRAIN_FAULTS": "nan_loss@3"})
    events = [json.loads(line) for line in (out / "guard_events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"], e["action"]) for e in events] == [(3, "nonfinite_loss", action)]
    assert all(v == v for v in losses(out))  # no NaN reached the record of an accepted step... except the event
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["guard_events"] == 1
    state = final_state(out)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    if action == "rollback":
        trainer_state = json.loads((out / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())
        assert trainer_state["loader"]["skipped"] == [16]  # the batch of step 3 (positions 16..23) is never used
        steps = [r for r in metric(out, "step")]
        assert steps == [1, 2, 3, 4, 5]


def test_a_loss_spike_is_caught(tmp_path):
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("steps = 5", "steps = 8"))
    run(job, tmp_path / "spike", 1, "guard.spike_min_history=4", "guard.spike_zscore=4.0",
        extra_env={"POLYTRAIN_FAULTS": "spike@7"})
    events = [json.loads(line) for line in (tmp_path / "spike" / "guard_events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in events] == [(7, "loss_spike")]


def test_too_many_bad_steps_stop_the_run_with_a_report(tmp_path):
    job = write_job(tmp_path)
    with pytest.raises(AssertionError) as err:
        run(job, tmp_path / "bad", 1, "guard.max_consecutive=1",
            extra_env={"POLYTRAIN_FAULTS": "nan_loss@2,nan_loss@3"})
    assert "2 event(s) in a row, limit 1: stopping" in str(err.value)
    assert (tmp_path / "bad" / "guard_events.jsonl").read_text().count("nonfinite_loss") == 2


def test_a_rank_stuck_in_a_step_ends_the_job_with_stack_dumps(tmp_path):
    job = write_job(tmp_path)
    started = time.time()
    with pytest.raises(AssertionError) as err:
        run(job, tmp_path / "hang", 2, "watchdog.step_timeout_s=5", "watchdog.first_step_timeout_s=60",
            timeout=120, extra_env={"POLYTRAIN_FAULTS": "hang@3:rank=1:seconds=300"})
    elapsed = time.time() - started
    assert elapsed < 90, elapsed  # bounded: the watchdog, not the 300 s sleep nor the 60 s collective timeout
    assert "exited" in str(err.value)
    stuck = (tmp_path / "hang" / "hang_rank1.txt").read_text()
    assert "step 3 did not finish within 5 s" in stuck and "faults.py" in stuck and "during_step" in stuck
    waiting = (tmp_path / "hang" / "hang_rank0.txt").read_text()
    assert "did not finish" in waiting and "File" in waiting  # rank 0's stack: waiting in a collective


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A tmpfs too small for two checkpoints when one can be mounted here; else an injected ENOSPC."""
    job = write_job(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=26M", "tmpfs", str(store)],
                             capture_output=True).returncode == 0
    try:
        extra = {} if mounted else {"POLYTRAIN_FAULTS": "disk_full@4"}
        keep = 3 if mounted else 2
        with pytest.raises(AssertionError) as err:
            run(job, tmp_path / "full", 1, "checkpoint.every=2", f'checkpoint.dir="{store}"',
                f"checkpoint.keep_last={keep}", extra_env=extra)
        message = str(err.value)
        assert "final checkpoint (step 5) could not be saved" in message
        assert "FAILED and was discarded" in message and "free space on" in message
        assert mounted or "No space left on device" in message
        assert (store / "step_00000002" / "manifest.json").is_file()
        assert not any(p.name.endswith(".tmp") for p in store.iterdir())
        assert len(losses(tmp_path / "full")) >= 4  # training went on after the failed save
    finally:
        if mounted:
            subprocess.run(["umount", str(store)], check=False)
