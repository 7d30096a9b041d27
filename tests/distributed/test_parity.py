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


def test_expert_fsdp_splits_experts_by_another_dimension_when_they_do_not_divide(tmp_path):
    """3 experts per expert-parallel rank over 2 expert-data-parallel ranks: FSDP shards the stacked experts along
    their first dimension that divides evenly (here the intermediate one) instead of padding whole experts."""
    job = write_job(tmp_path, model='preset = "tiny"\nn_routed_experts = 6\nn_group = 2\ntopk_group = 1')
    run(job, tmp_path / "single", 1)
    run(job, tmp_path / "ep2x2", 4, "parallel.ep=2")
    assert_parity(tmp_path / "single", tmp_path / "ep2x2")


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


# 1f1b, zbv and dualpipev run with MTP and the balance loss below (test_pipeline_pp2_carries_mtp_...)
@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "gpipe"])
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


@pytest.fixture(scope="module")
def v3_features(tmp_path_factory):
    """tiny-v3 with 4 layers (MTP, YaRN, balance loss) and its single-process run."""
    root = tmp_path_factory.mktemp("v3pp")
    job = write_job(root, model='preset = "tiny-v3"\nnum_hidden_layers = 4')
    run(job, root / "single", 1)
    return job, root / "single"


@pytest.mark.parametrize(("schedule", "recompute"), [("1f1b", "none"), ("zbv", "none"), ("dualpipev", "full")])
def test_pipeline_pp2_carries_mtp_and_balance_loss_to_the_objectives_loss(v3_features, tmp_path, schedule, recompute):
    """The last stage hands the MTP hidden states and every stage's balance losses to SFT's own loss function. With
    recomputation a zero-bubble schedule runs each backward whole (B computes the weight gradients too)."""
    job, single = v3_features
    run(job, tmp_path / schedule, 2, "parallel.pp=2", f'parallel.pp_schedule="{schedule}"',
        f'parallel.activation_checkpointing="{recompute}"')
    assert_parity(single, tmp_path / schedule)


def test_pipeline_pp2_with_mtp_and_fsdp_dp_shard_2(v3_features, tmp_path):
    """One sample per micro-batch on both sides: the balance loss is a mean over the rows (sequences) of each
    micro-batch, so the micro-batch size is part of the objective."""
    job, _ = v3_features
    run(job, tmp_path / "single", 1, "train.micro_batch_size=1")
    run(job, tmp_path / "pp2dp2", 4, "parallel.pp=2", "train.micro_batch_size=1")
    assert_parity(tmp_path / "single", tmp_path / "pp2dp2")


def test_pipeline_pp2_with_tensor_parallel_tp2_and_sequence_parallelism(v3_features, tmp_path):
    """pp 2 x tp 2 (sequence parallel), no data parallelism: the state, MTP embeddings and hidden states travel as
    each tensor-parallel rank's slice of the sequence, and without FSDP the norms' partial gradients are reduced
    over the tensor-parallel ranks before clipping."""
    job, single = v3_features
    run(job, tmp_path / "pp2tp2", 4, "parallel.pp=2", "parallel.tp=2")
    assert_parity(single, tmp_path / "pp2tp2")


@pytest.fixture(scope="module")
def v4_unpacked(tmp_path_factory):
    """tiny-v4 with an index_topk that covers every compressed entry, unpacked rows, and its single-process run."""
    root = tmp_path_factory.mktemp("v4pp")
    job = write_job(root, model='preset = "tiny-v4"\nindex_topk = 16')
    run(job, root / "single", 1, "data.packing=false")
    return job, root / "single"


@pytest.mark.parametrize(("schedule", "tp"), [("1f1b", 1), ("zbv", 1), ("dualpipev", 2)],
                         ids=["1f1b", "zbv", "dualpipev-tp2"])
def test_pipeline_pp2_runs_deepseek_v4_through_the_family_hooks(v4_unpacked, tmp_path, schedule, tp):
    """Hyper-connection streams between stages, token ids carried for hash routing, MTP on the last stage; with
    tp = 2 (4 processes, the layout the planner picks for V4-Pro: DualPipeV over tensor parallelism with sequence
    parallelism) the stages pass each rank's slice of the streams. index_topk covers every compressed entry: with
    fewer, the indexer's choice among equal (zero) scores follows torch.topk's tie order, which depends on the padded
    width (as in the Hugging Face reference), and pipeline micro-batches are padded to data.max_seq_len while
    single-process ones are not."""
    job, single = v4_unpacked
    run(job, tmp_path / "pp2", 2 * tp, "data.packing=false", "parallel.pp=2", f'parallel.pp_schedule="{schedule}"',
        f"parallel.tp={tp}")
    assert_parity(single, tmp_path / "pp2")



@pytest.fixture(scope="module")
def v4_single(tmp_path_factory):
    """tiny-v4 (CSA with the indexer's top-k, HCA, sliding layers, hash routing, mHC, MTP) and its single-process
    run, with and without packing (made on first use)."""
    root = tmp_path_factory.mktemp("v4tp")
    job = write_job(root, model='preset = "tiny-v4"')
    singles = {}

    def single(packing: bool):
        if packing not in singles:
            singles[packing] = root / f"single-{packing}"
            run(job, singles[packing], 1, f"data.packing={str(packing).lower()}")
        return job, singles[packing]

    return single


@pytest.mark.parametrize(("world", "packing", "overrides"),
                         [(2, False, ("parallel.sequence_parallel=false",)), (4, True, ("parallel.ep=2",))],
                         ids=["tp2-unpacked", "tp2ep2-sp"])
def test_tensor_parallel_tp2_runs_deepseek_v4(v4_single, tmp_path, world, packing, overrides):
    """Heads (with their sinks and output groups) split over 2 ranks; the shared key/value head, the compressed
    entries, the indexer and the hyper-connections replicated. Without sequence parallelism every rank runs the
    hyper-connections on whole rows; with it (4 processes: the experts over dp_shard 2 = ep 2, packed rows) each rank
    runs them on its slice of the sequence, gathered into attention and the MoE."""
    job, single = v4_single(packing)
    run(job, tmp_path / "tp2", world, f"data.packing={str(packing).lower()}", "parallel.tp=2", *overrides)
    assert_parity(single, tmp_path / "tp2")
