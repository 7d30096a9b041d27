"""Every parallel layout reproduces the single-process run: 5 optimizer steps of the seeded tiny model, loss per step
within 1e-5 relative, final parameters within 1e-5 (fp32, gloo, one thread per rank)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import assert_parity, run, write_job


def test_fsdp_dp_shard_2_matches_single_process(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "fsdp2", 2)
    assert_parity(single, tmp_path / "fsdp2")


def test_fsdp_dp_shard_4_matches_single_process(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "fsdp4", 4)
    assert_parity(single, tmp_path / "fsdp4")


def test_expert_parallel_ep2_over_2_ranks(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "ep2", 2, "parallel.ep=2")
    assert_parity(single, tmp_path / "ep2")


def test_expert_parallel_ep2_with_expert_fsdp_over_4_ranks(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "ep2x2", 4, "parallel.ep=2")
    assert_parity(single, tmp_path / "ep2x2")


def test_full_activation_checkpointing_with_fsdp(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "ac", 2, 'parallel.activation_checkpointing="full"')
    assert_parity(single, tmp_path / "ac")


def test_selective_checkpointing_of_mla_up_projections_norms_experts_and_mlps(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "sac", 1, 'parallel.activation_checkpointing="selective"', "parallel.ac_every=2",
        'parallel.ac_modules=["mla_up_proj", "norm", "experts", "mlp"]')
    assert_parity(single, tmp_path / "sac")


def test_cpu_offload_with_fsdp(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "offload", 2, "parallel.cpu_offload=true")
    assert_parity(single, tmp_path / "offload")


def test_gradient_accumulation_8x1_equals_1x8(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "accum", 1, "train.micro_batch_size=1")
    run(job, tmp_path / "whole", 1, "train.micro_batch_size=8")
    assert_parity(single, tmp_path / "accum")
    assert_parity(single, tmp_path / "whole")


def test_tensor_parallel_tp2_with_fsdp_dp_shard_2(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "tp2", 4, "parallel.tp=2")
    assert_parity(single, tmp_path / "tp2")


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zbv", "dualpipev", "gpipe"])
def test_pipeline_pp2_matches_single_process(reference, tmp_path, schedule):
    job, single = reference
    run(job, tmp_path / schedule, 2, "parallel.pp=2", f'parallel.pp_schedule="{schedule}"')
    assert_parity(single, tmp_path / schedule)


def test_pipeline_pp2_with_fsdp_dp_shard_2(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "pp2fsdp2", 4, "parallel.pp=2", "train.micro_batch_size=1")
    assert_parity(single, tmp_path / "pp2fsdp2")


def test_pipeline_pp2_expert_parallel_ep2_fsdp_8_processes(reference, tmp_path):
    """pp 2 x (dp_shard 4 = ep 2 x expert-FSDP 2): every strategy but tp at once."""
    job, single = reference
    run(job, tmp_path / "pp2ep2", 8, "parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1")
    assert_parity(single, tmp_path / "pp2ep2")


def test_tensor_parallel_without_sequence_parallel(reference, tmp_path):
    job, single = reference
    run(job, tmp_path / "tp2nosp", 2, "parallel.tp=2", "parallel.sequence_parallel=false")
    assert_parity(single, tmp_path / "tp2nosp")


def test_v3_features_mtp_yarn_balance_loss_under_tp2_ep2(tmp_path):
    """tiny-v3 (MTP, YaRN, sequence-wise balance loss) with tp=2 (sequence parallel) x dp_shard=2 = ep 2."""
    job = write_job(tmp_path, model='preset = "tiny-v3"')
    run(job, tmp_path / "single", 1)
    run(job, tmp_path / "tp2ep2", 4, "parallel.tp=2", "parallel.ep=2")
    assert_parity(tmp_path / "single", tmp_path / "tp2ep2")
