"""The planner and the engine agree on what runs.

For every layout in the planner's search space (every framework's, not only polytrain's) of the released presets at
256 and 1,024 devices, the job config the planner would emit for it goes through the engine's start-up checks (the
config loader, `ParallelDims.resolve` and `check_job`, which the trainer runs before building anything):

- every layout the planner marks runnable on polytrain passes them;
- every layout they refuse is marked not runnable, and every layout marked not runnable that they accept is one the
  emitted config cannot express (context parallelism, ZeRO-1, optimizer-only offload, experts over TP ranks): the
  engine would run a different layout.
"""

from __future__ import annotations

import json

import pytest

from polytrain.config import build_config, tomllib
from polytrain.errors import ConfigError
from polytrain.models import preset
from polytrain.objectives import registry
from polytrain.parallel.mesh import ParallelDims
from polytrain.plan.hardware import load_chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.report import job_config
from polytrain.plan.search import candidates
from polytrain.train.trainer import check_job

INEXPRESSIBLE = ("context parallel", "ZeRO-1", "optimizer-only offload", "ep drawn from tensor-parallel ranks")


def engine_refusal(job: Job, layout: Layout) -> str | None:
    """The engine's error for the job config the planner emits for `layout`, or None if it would start."""
    try:
        config = build_config(job_config(job, layout))
        dims = ParallelDims.resolve(config.parallel, layout.devices, config.model)
        check_job(registry.objective_class(config.run.algorithm), config, dims)
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
@pytest.mark.parametrize("model", ["deepseek-v3-671b", "deepseek-v4-flash", "deepseek-v4-pro"])
def test_the_planner_marks_runnable_exactly_what_the_engine_starts(model, algorithm):
    chip = load_chip("ascend-910c")
    checked = runnable = 0
    for devices in (256, 1024):
        job = Job(preset(model), 4096, 4096 * 2048, algorithm=algorithm)
        seen: set[Layout] = set()
        refusals: dict[str, str | None] = {}
        for layout in candidates(job, devices, chip, engine_only=False):
            layout = layout.with_(recompute="full" if layout.recompute != "none" else "none")
            if layout in seen or layout.problems(job.model):
                continue  # judged already (recomputation does not change the verdicts); or no framework runs it
            seen.add(layout)
            gaps = tuple(layout.job_gaps(job))
            key = json.dumps(job_config(job, layout), sort_keys=True)
            if key not in refusals:
                refusals[key] = engine_refusal(job, layout)
            refusal = refusals[key]
            checked += 1
            runnable += not gaps
            if not gaps:
                assert refusal is None, f"{layout}: marked runnable, but the engine says: {refusal}"
            elif refusal is None:
                assert any(g.startswith(INEXPRESSIBLE) for g in gaps), f"{layout}: the engine starts it, but {gaps}"
    assert checked > 100 and runnable > 10, (checked, runnable)


def test_the_emitted_batch_splits_over_the_layout():
    """The issue's V4-Pro example: 24M tokens of 4K sequences on 512 data-parallel ranks (5,859 sequences)."""
    job = Job(preset("deepseek-v4-pro"), 4096, 24_000_000)
    layout = Layout(dp=512, pp=2, ep=128, schedule="dualpipev")
    config = job_config(job, layout)
    assert config["train"]["global_batch_size"] == 5632  # 11 micro-batches per rank, the nearest to 5,859 / 512
    assert engine_refusal(job, layout) is None and not layout.job_gaps(job)


def test_precision_and_pipeline_gaps_are_named():
    layout = Layout(dp=128, pp=2, ep=64)
    job = Job(preset("deepseek-v3-671b"), 4096, 4096 * 2048, precision="fp8")
    assert layout.job_gaps(job) == ["fp8 training (the engine trains in bf16 or fp32)"]
    dpo = Job(preset("deepseek-v3-671b"), 4096, 4096 * 2048, algorithm="dpo")
    assert layout.job_gaps(dpo) == ["pipeline parallelism for dpo"]
    assert "not supported for dpo" in engine_refusal(dpo, layout)


@pytest.mark.parametrize("model", ["tiny-v3", "tiny-v4"])
def test_the_planner_assumes_the_attention_the_engine_runs(model):
    """Whether the family's attention keeps seq x seq scores for backward, as the planner assumes (its FLOPs and
    memory), is what the engine's attention does: the tensors autograd saves in a forward pass say."""
    import torch

    from polytrain.models import build_model
    from polytrain.models.registry import spec_for

    config = preset(model)
    seq = 64
    lm = build_model(config, "cpu", seed=0)
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if tensor.dim() == 4 and tensor.shape[-2] == seq and tensor.shape[-1] >= seq:  # [B, H, queries, keys]
            largest = max(largest, tensor.shape[-2] * tensor.shape[-1])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(torch.randint(0, config.vocab_size, (1, seq)))
    job = Job(config, seq, seq)
    assert job.attention_fused == spec_for(config).planner.fused_attention == (largest == 0), largest


def test_the_block_attention_is_timed_at_the_work_it_does_and_stays_linear():
    """V4's block attention multiplies masked window keys and every HCA entry too: the planner times that work,
    which grows with the window and the entries, not with seq x seq (the dense reference computed 531 / 1,210
    GFLOP/token at 4K / 16K for V4-Pro)."""
    for seq in (4096, 16384):
        v4 = Job(preset("deepseek-v4-pro"), seq, seq * 1024)
        assert v4.flops.total < v4.executed_flops.total < 1.1 * v4.flops.total
        assert f"{v4.executed_flops.total / 1e9:,.0f} GFLOP/token computed" in v4.attention_note()
    v3 = Job(preset("deepseek-v3-671b"), 4096, 4096 * 1024)
    assert v3.executed_flops is v3.flops and v3.attention_note().startswith("attention: fused")


def test_the_config_emitted_for_the_cpu_trains_in_fp32_and_says_what_to_fill_in():
    from polytrain.plan.report import emit_config
    from polytrain.plan.search import search

    job = Job(preset("tiny"), 64, 64 * 32)
    plan = search(job, 4, load_chip("cpu")).plans[0]
    text = emit_config(job, plan, load_chip("cpu"))
    assert "hf_path" in text and "polytrain dryrun THIS.toml --world-size 4" in text
    config = build_config(tomllib.loads(text))
    assert config.run.precision == "fp32" and config.parallel.param_dtype == "fp32"
    assert engine_refusal(job, plan.layout) is None
    assert job_config(job, plan.layout, load_chip("h100"))["run"]["precision"] == "bf16"
