"""The product path: `torchrun ... -m polytrain sft` (torchrun's own rendezvous), plus layouts beyond parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.distributed.harness import assert_parity, run, write_job


def test_torchrun_standalone_runs_the_same_config(reference, tmp_path):
    job, single = reference
    out = tmp_path / "torchrun"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "polytrain", "sft", str(job), "--set", f'run.output_dir="{out}"', "--set", "parallel.ep=2"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"].startswith("2 processes")
    assert_parity(single, out)


def test_hsdp_dp_replicate_2_dp_shard_2(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "hsdp", 4, "parallel.dp_replicate=2", "parallel.dp_shard=2")
    assert_parity(single, tmp_path / "hsdp")


def test_a_wrong_layout_fails_fast_on_every_rank(tmp_path):
    job = write_job(tmp_path)
    try:
        run(job, tmp_path / "bad", 2, "parallel.tp=4", timeout=60)
    except AssertionError as err:
        assert "world size 2 is not divisible" in str(err)
    else:
        raise AssertionError("a layout that does not fit the world size must fail")


def test_fsdp_bf16_parameters_with_fp32_reduction_track_fp32(reference, tmp_path):
    """Mixed precision is not exact, so this is a closeness check: bf16 compute stays within 1% of the fp32 run
    (the single-process one, which the fp32 FSDP runs match to 1e-5)."""
    from tests.distributed.harness import losses

    job, fp32 = reference
    run(job, tmp_path / "bf16", 2, 'parallel.param_dtype="bf16"', 'parallel.reduce_dtype="fp32"')
    for a, b in zip(losses(fp32), losses(tmp_path / "bf16")):
        assert abs(a - b) <= 0.01 * a
    assert losses(fp32) != losses(tmp_path / "bf16")  # bf16 really was used
