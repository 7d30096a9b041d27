"""Context parallelism reproduces the single-process run (gloo, fp32, 5 optimizer steps; loss per step within
1e-5 relative, final parameters within 1e-5): tiny-v3 (MLA, MTP, YaRN, sequence-wise balance loss, aux-loss-free
bias updates) and tiny-v4 (sliding window, CSA with its indexer, HCA, hash routing, hyper-connections, MTP) on rows
of about 900 packed tokens (32 conversations of 19-36 tokens per micro-batch, max_seq_len 1,024), so with cp = 4
each of the 8 chunks of a row holds several documents and many documents, windows and compressed blocks cross a
chunk boundary."""

from __future__ import annotations

import pytest

from tests.distributed.harness import assert_parity, run, write_job


def long_rows_job(root, preset: str):
    job = write_job(root, model=f'preset = "{preset}"', samples=96, max_seq_len=1024, global_batch_size=64,
                    micro_batch_size=32)
    run(job, root / "single", 1)
    return job, root / "single"


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    return long_rows_job(tmp_path_factory.mktemp("cp"), "tiny-v3")


@pytest.fixture(scope="module")
def long_v4_rows(tmp_path_factory):
    return long_rows_job(tmp_path_factory.mktemp("cp-v4"), "tiny-v4")


@pytest.mark.parametrize(("world", "overrides"), [
    (4, ("parallel.cp=4",)),
    # x dp_shard 2 (FSDP over dp_shard x cp = 4 ranks, 2 ranks' worth of data), experts over those 4 ranks
    (4, ("parallel.cp=2", "parallel.ep=2")),
    # the stages' rows hold the chunks; MTP and balance loss on stage 2; each micro-batch's 32 conversations in the
    # 2 rows packing can need (Objective.pipeline_rows), not 32 padded ones
    (4, ("parallel.cp=2", "parallel.pp=2")),
    (4, ("parallel.cp=2", "parallel.tp=2")),  # heads over tp, each rank's chunks split again by sequence parallelism
], ids=["cp4", "cp2-dp2-ep2", "cp2-pp2", "cp2-tp2"])
def test_context_parallel_matches_single_process(long_rows, tmp_path, world, overrides):
    job, single = long_rows
    run(job, tmp_path / "cp", world, *overrides)
    assert_parity(single, tmp_path / "cp")


@pytest.mark.parametrize(("world", "overrides"), [
    (4, ("parallel.cp=4",)),
    (4, ("parallel.cp=2", "parallel.ep=2")),
    (4, ("parallel.cp=2", "parallel.tp=2")),
], ids=["cp4", "cp2-dp2-ep2", "cp2-tp2"])
def test_context_parallel_runs_deepseek_v4(long_v4_rows, tmp_path, world, overrides):
    """Each rank gathers the row's shared keys and its compressors' per-token series, pools the whole row's entries,
    and attends its own chunks (models/deepseek_v4/context.py); under tp = 2 each rank's heads read the gathered
    keys, whose gradient sums over the heads' ranks before it is reduce-scattered, and sequence parallelism splits
    each rank's chunks again."""
    job, single = long_v4_rows
    run(job, tmp_path / "cp", world, *overrides)
    assert_parity(single, tmp_path / "cp")


def test_context_parallel_unpacked_rows_with_padding(tmp_path):
    """One conversation per row, padded to the micro-batch's longest (rounded to 2 x cp): causal masking in
    whole-row positions without document ids."""
    job = write_job(tmp_path, model='preset = "tiny-v3"', extra="", samples=32)
    run(job, tmp_path / "single", 1, "data.packing=false")
    run(job, tmp_path / "cp2", 2, "data.packing=false", "parallel.cp=2")
    assert_parity(tmp_path / "single", tmp_path / "cp2")


def test_resume_with_a_different_context_parallel_degree(long_rows, tmp_path):
    """3 steps with cp = 4, the rest with cp = 2 on 2 processes: the checkpoint and the data position do not depend
    on how rows are split."""
    job, single = long_rows
    run(job, tmp_path / "moved", 4, "parallel.cp=4", flags=("--stop-at-step", "3"))
    run(job, tmp_path / "moved", 2, "parallel.cp=2", flags=("--resume",))
    assert_parity(single, tmp_path / "moved")


def test_dpo_with_chosen_and_rejected_rows_split(tmp_path):
    """DPO (sigmoid, frozen reference laid out like the policy): each pair's sequence log-probabilities are summed
    over the cp ranks before the loss; every rank backpropagates the same loss through its own tokens."""
    job = write_job(tmp_path, extra='[dpo]\nloss = "sigmoid"\nreference = "model"\n', data="pref_train.jsonl")
    run(job, tmp_path / "single", 1, "train.micro_batch_size=4", command="dpo")
    run(job, tmp_path / "cp2", 4, "parallel.cp=2", "train.micro_batch_size=2", command="dpo")
    assert_parity(tmp_path / "single", tmp_path / "cp2")
