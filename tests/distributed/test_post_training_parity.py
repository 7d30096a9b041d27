"""Post-training losses are exactly global: GRPO, DPO and distillation give the same losses, gradient norms and
parameters for 1 or 2 data-parallel (or, for GRPO, context-parallel) processes and for any micro-batch split (fp32,
gloo).

GRPO rollouts are seeded per completion, so every layout samples the same completions; the rewards logged per step
are compared first, so a sampling difference is reported as such rather than as a gradient mismatch."""

from __future__ import annotations

import pytest

from tests.distributed.harness import assert_parity, final_state, metric, run, write_job

GRPO = """
[grpo]
group_size = 4
max_new_tokens = 6
rewards = ["similarity"]   # partial credit: a random model's completions still differ in reward
epochs = 2
kl_coef = 0.05
kl_estimator = "k3"
loss_aggregation = "{aggregation}"
"""


def grpo_job(root, aggregation):
    return write_job(root, extra=GRPO.format(aggregation=aggregation), samples=32)


def assert_grpo_parity(reference, parallel):
    assert metric(reference, "reward") == pytest.approx(metric(parallel, "reward"), abs=1e-9), "rollouts differ"
    ref_loss, par_loss = metric(reference, "loss"), metric(parallel, "loss")
    assert len(ref_loss) == 4
    assert par_loss == pytest.approx(ref_loss, abs=1e-6)
    ref_norm, par_norm = metric(reference, "grad_norm"), metric(parallel, "grad_norm")
    assert min(ref_norm) > 1e-3  # the gradients are not trivially zero
    assert par_norm == pytest.approx(ref_norm, rel=1e-5)
    ref, par = final_state(reference), final_state(parallel)
    assert max(float((ref[k] - par[k]).abs().max()) for k in ref) <= 1e-5


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_grpo_micro_batching_and_data_parallel(tmp_path, aggregation):
    """4 prompts x 4 samples per rollout, 2 epochs: 1 x 16 completions vs 16 x 1, and 2 ranks x 8."""
    job = grpo_job(tmp_path, aggregation)
    base = ["train.steps=4", "train.global_batch_size=4"]
    run(job, tmp_path / "whole", 1, *base, "train.micro_batch_size=16", command="grpo")
    run(job, tmp_path / "accum", 1, *base, "train.micro_batch_size=1", command="grpo")
    assert_grpo_parity(tmp_path / "whole", tmp_path / "accum")
    if aggregation == "seq-mean-token-mean":
        run(job, tmp_path / "dp2", 2, *base, "train.micro_batch_size=8", command="grpo")
        assert_grpo_parity(tmp_path / "whole", tmp_path / "dp2")
        # context parallelism: both ranks sample the same rollouts whole, then each trains on its chunks of every
        # row (per-sequence means over whole rows, stored log-probs laid out in whole-row positions)
        run(job, tmp_path / "cp2", 2, *base, "train.micro_batch_size=16", "parallel.cp=2", command="grpo")
        assert_grpo_parity(tmp_path / "whole", tmp_path / "cp2")


def test_dpo_micro_batching_and_data_parallel(tmp_path):
    job = write_job(tmp_path, extra='[dpo]\nloss = "sigmoid"\nreference = "model"\n', data="pref_train.jsonl")
    run(job, tmp_path / "single", 1, "train.micro_batch_size=8", command="dpo")
    run(job, tmp_path / "accum", 1, "train.micro_batch_size=1", command="dpo")
    run(job, tmp_path / "dp2", 2, "train.micro_batch_size=2", command="dpo")
    assert_parity(tmp_path / "single", tmp_path / "accum")
    assert_parity(tmp_path / "single", tmp_path / "dp2")


def test_distillation_data_parallel(tmp_path):
    """The teacher is any run with the same tokenizer: here a 5-step SFT run."""
    job = write_job(tmp_path, extra="[distill]\nmax_new_tokens = 6\ngroup_size = 2\n", samples=32)
    run(job, tmp_path / "teacher", 1)
    teacher = f'distill.teachers=["{tmp_path / "teacher"}"]'
    run(job, tmp_path / "single", 1, teacher, "train.micro_batch_size=16", command="distill")
    run(job, tmp_path / "dp2", 2, teacher, "train.micro_batch_size=1", command="distill")
    assert_parity(tmp_path / "single", tmp_path / "dp2")


def test_grpo_deepseek_v4_under_tensor_parallel(tmp_path):
    """tiny-v4 under tp=2: rollouts decode with the KV cache on each rank's heads (their sinks split with them) and
    sample the same completions; the update matches one process."""
    job = write_job(tmp_path, model='preset = "tiny-v4"', extra=GRPO.format(aggregation="token-mean"), samples=32)
    base = ["train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=16"]
    run(job, tmp_path / "single", 1, *base, command="grpo")
    run(job, tmp_path / "tp2", 2, *base, "parallel.tp=2", "parallel.sequence_parallel=false", command="grpo")
    assert_grpo_parity(tmp_path / "single", tmp_path / "tp2")
