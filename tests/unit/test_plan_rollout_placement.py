"""The planner's GRPO phases follow where rollouts run: on the training devices (colocated) or on devices of their
own (`--rollout-devices`, disaggregated), and the config it emits for the latter starts (the engine's checks and a
dry run)."""

from __future__ import annotations

from dataclasses import replace

from polytrain.config import build_config
from polytrain.models import preset
from polytrain.objectives import registry
from polytrain.parallel.mesh import ParallelDims
from polytrain.plan.hardware import load_chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import SYNC_BUCKET_BYTES, _kv_cache
from polytrain.plan.report import job_config
from polytrain.plan.search import USABLE_FRACTION, evaluate, search
from polytrain.plan.timing import ENGINE_WEIGHT_SHARE, grpo_phases
from polytrain.train.trainer import check_job


def test_disaggregated_rollouts_move_the_kv_cache_and_the_decoding_off_the_training_devices():
    chip = load_chip("h100")
    colocated = Job(preset("deepseek-v3-671b"), 3072, 2048 * 3072, algorithm="grpo")
    apart = replace(colocated, rollout_devices=64)
    layout = Layout(dp=192, ep=16, offload="all", recompute="full")
    near, far = evaluate(colocated, layout, chip), evaluate(apart, layout, chip)
    kv = _kv_cache(colocated, layout)
    assert kv > SYNC_BUCKET_BYTES
    assert near.memory.rollout - far.memory.rollout == kv - SYNC_BUCKET_BYTES  # the trainer keeps one bucket
    assert near.memory.peak == far.memory.peak  # the update step is the same work

    mine, theirs = grpo_phases(colocated, layout, chip, near.time), grpo_phases(apart, layout, chip, far.time)
    assert mine.rollout_instances == 0 and theirs.rollout_instances >= 1
    assert theirs.rollout_instances * theirs.devices_per_instance <= 64
    usable = chip.memory_bytes * USABLE_FRACTION
    weights = 2 * 671e9 / theirs.devices_per_instance
    assert weights <= ENGINE_WEIGHT_SHARE * usable * 1.05 and theirs.rollout_memory <= usable
    # the same update and log-probs; the weights cross the inter-node network instead of NVLink
    assert (theirs.update, theirs.log_probs) == (mine.update, mine.log_probs)
    assert theirs.weight_sync > 10 * mine.weight_sync


def test_the_config_emitted_for_disaggregated_rollouts_passes_the_engines_checks_and_a_dry_run():
    from polytrain.dryrun.run import dry_run

    chip = load_chip("h100")
    job = Job(preset("deepseek-v3-671b"), 3072, 2048 * 3072, algorithm="grpo", rollout_devices=64)
    plan = next(p for p in search(job, 192, chip).plans if not p.engine_gaps)
    config = build_config(job_config(job, plan.layout, chip))
    grpo = config.section("grpo")
    assert grpo.engine == "vllm" and len(grpo.vllm_addresses()) == len(grpo.rollout_ranks) >= 1
    assert all(0 <= r < 192 for r in grpo.rollout_ranks) and len(set(grpo.rollout_ranks)) == len(grpo.rollout_ranks)
    dims = ParallelDims.resolve(config.parallel, 192, config.model)
    check_job(registry.objective_class("grpo"), config, dims)

    small = Job(preset("tiny"), 64, 16 * 64, algorithm="grpo", prompt_len=32, response_len=32, rollout_devices=2)
    lay = next(p for p in search(small, 4, load_chip("cpu")).plans if not p.engine_gaps).layout
    spec = job_config(small, lay, load_chip("cpu"))
    assert spec["grpo"]["rollout_ranks"] and spec["grpo"]["engine"] == "vllm"
    [report] = dry_run(build_config(spec), lay.devices, [0])  # no engine starts: the update step is measured
    assert 0 < report.parameter_bytes < report.peak_bytes


def test_rollout_ranks_outside_the_world_are_refused_before_anything_is_built():
    import pytest

    from polytrain.errors import ConfigError

    spec = {"run": {"algorithm": "grpo"}, "model": {"preset": "tiny"},
            "data": {"train_path": "x.jsonl", "tokenizer": "t.json"},
            "train": {"global_batch_size": 4, "micro_batch_size": 1},
            "grpo": {"engine": "vllm", "rollout_ranks": [0, 4]}}
    config = build_config(spec)
    with pytest.raises(ConfigError, match=r"rank 4 is not among the job's 4 ranks"):
        check_job(registry.objective_class("grpo"), config, ParallelDims.resolve(config.parallel, 4, config.model))
    with pytest.raises(ConfigError, match="needs an external engine"):
        build_config({**spec, "grpo": {"rollout_ranks": [1]}})
    with pytest.raises(ConfigError, match="list one rank per server"):
        build_config({**spec, "grpo": {"engine": "vllm", "vllm_address": "a:1,b:2", "rollout_ranks": [0]}})


def test_colocated_phases_keep_their_values():
    """The colocated GRPO phases (rollout, log-probs, weight sync, seconds) as the planner gave them before it
    modelled disaggregated rollouts, for three layouts of the released presets (512 samples a step)."""
    import pytest

    cases = [
        ("deepseek-v3-671b", Layout(dp=16, pp=16, ep=16, zero=1, recompute="full"), "h100", 128, 1408,
         (160.79887616542143, 0.8322394825590292, 0.04321292490810709)),
        ("deepseek-v4-flash", Layout(dp=64, tp=2, ep=64, recompute="full"), "ascend-910c", 1024, 2048,
         (47.73597055120052, 1.9058563406292552, 0.06972989738821793)),
        ("deepseek-v4-pro", Layout(dp=128, pp=8, ep=128, recompute="full", schedule="dualpipev"), "ascend-910c", 512,
         4096, (274.9506330131585, 1.276625645679495, 0.048872892971042275)),
    ]
    for model, layout, chip_name, prompt, response, expected in cases:
        job = Job(preset(model), prompt + response, 512 * (prompt + response), algorithm="grpo", prompt_len=prompt,
                  response_len=response)
        chip = load_chip(chip_name)
        phases = grpo_phases(job, layout, chip, evaluate(job, layout, chip).time)
        assert (phases.rollout, phases.log_probs, phases.weight_sync) == pytest.approx(expected, rel=1e-9), model
