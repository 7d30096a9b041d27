"""Hardware catalogue, layout search, bad input and calibration."""

from __future__ import annotations

import json

import pytest

from polytrain.errors import ConfigError
from polytrain.models import preset
from polytrain.plan.calibrate import calibrate
from polytrain.plan.hardware import REQUIRED, chip_to_toml, known_chips, load_chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.search import evaluate, pressure, search


def test_catalogue_has_every_required_chip_with_a_source_per_figure():
    assert {"ascend-910b", "ascend-910c", "ascend-910c-die", "a100", "h100", "h800", "h20", "b200", "cpu"} <= set(
        known_chips())
    for name in known_chips():
        chip = load_chip(name)
        assert set(REQUIRED) - {"name", "description"} <= set(chip.sources), name


def test_unknown_chip_lists_the_known_ones():
    with pytest.raises(ConfigError, match="did you mean `h800`.*ascend-910b"):
        load_chip("h900")


def test_user_chip_file_round_trips(tmp_path):
    chip = load_chip("h100").with_efficiency(compute=0.45)
    path = tmp_path / "mine.toml"
    path.write_text(chip_to_toml(chip))
    assert load_chip(str(path)) == chip
    path.write_text(chip_to_toml(chip).replace("hbm_gb", "hbm_gib"))
    with pytest.raises(ConfigError, match="missing chip key"):
        load_chip(str(path))


def test_search_ranks_thousands_of_layouts_in_seconds():
    job = Job(preset("deepseek-v3-671b"), 4096, 8_000_000)
    job.shape  # noqa: B018  (built once per model on the meta device, outside the timed search)
    result = search(job, 512, load_chip("h800"))
    # ~3,000 layouts; about 1 s on an idle core, 15 s leaves room for a loaded CI machine
    assert result.evaluated > 2000 and result.seconds < 15
    speeds = [p.time.tokens_per_s_per_device for p in result.plans]
    assert speeds[0] >= max(speeds) * 0.995 and all(p.fits for p in result.plans)


def test_model_that_cannot_fit_reports_the_leanest_layout():
    job = Job(preset("deepseek-v4-pro"), 4096, 4_000_000)
    result = search(job, 16, load_chip("ascend-910b"))
    assert not result.plans and result.closest is not None
    assert pressure(result.closest.memory, load_chip("ascend-910b")) > 1


def test_impossible_device_count_says_what_would_work():
    job = Job(preset("deepseek-v4-flash"), 4096, 4096)  # one sequence per step: no data parallelism possible
    with pytest.raises(ConfigError, match="no layout splits 7 devices.*e.g. 4 or 8"):
        search(job, 7, load_chip("h100"))


def test_invalid_layout_says_why():
    job = Job(preset("deepseek-v3-671b"), 4096, 4_000_000)
    with pytest.raises(ConfigError, match="parallel.ep = 96 must divide model.n_routed_experts = 256"):
        evaluate(job, Layout(dp=96, ep=96), load_chip("h800"))


def test_grpo_adds_reference_model_to_the_update_step_and_kv_cache_to_the_rollout():
    job = Job(preset("deepseek-v3-671b"), 3072, 256 * 8 * 3072, algorithm="grpo")
    sft = Job(preset("deepseek-v3-671b"), 3072, 256 * 8 * 3072)
    layout = Layout(dp=64, pp=8, ep=64, zero=3, recompute="full")
    grpo, plain = evaluate(job, layout, load_chip("h800")).memory, evaluate(sft, layout, load_chip("h800")).memory
    assert grpo.rl > 0 and plain.rl == 0 and plain.rollout == 0
    # the update step: the policy's step (without the MTP modules' activations: GRPO scores the main head) + the
    # reference model
    assert grpo.rl < grpo.peak <= plain.peak + grpo.rl
    longer = evaluate(Job(preset("deepseek-v3-671b"), 3072 + 4096, 256 * 8 * (3072 + 4096), algorithm="grpo",
                          response_len=2048 + 4096), layout, load_chip("h800")).memory
    assert longer.rollout > grpo.rollout  # the KV cache grows with the completions, in the rollout only
    assert grpo.device == max(grpo.peak, grpo.rollout)


def test_calibrate_from_bench_json_sets_the_efficiency(tmp_path):
    bench = {"backend": "cpu", "device": "test", "tokens_per_s": 12000.0, "achieved_flops_per_s": 0.25e12,
             "peak_flops_per_s": 1e12, "mfu": 0.25, "world_size": 1}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    chip, _ = calibrate(str(path), load_chip("cpu"))
    assert chip.compute_efficiency == pytest.approx(0.25)
    assert "calibrated" in chip.sources["compute_efficiency"]
    bench.update(world_size=4, achieved_flops_per_s=4 * 0.25e12, peak_flops_per_s=4e12)  # whole-job figures
    path.write_text(json.dumps(bench))
    assert calibrate(str(path), load_chip("cpu"))[0].compute_efficiency == pytest.approx(0.25)
    bench.update(world_size=1, achieved_flops_per_s=5e12)  # more than the peak: wrong chip
    path.write_text(json.dumps(bench))
    with pytest.raises(ConfigError, match="wrong --hardware"):
        calibrate(str(path), load_chip("cpu"))


def test_dpo_adds_the_reference_model_and_its_forward():
    layout = Layout(dp=64, pp=8, ep=64, zero=3, recompute="full")
    sft = evaluate(Job(preset("deepseek-v3-671b"), 4096, 4_000_000), layout, load_chip("h800"))
    dpo = evaluate(Job(preset("deepseek-v3-671b"), 4096, 4_000_000, algorithm="dpo"), layout, load_chip("h800"))
    assert dpo.memory.rl > 0 and dpo.time.compute == pytest.approx(sft.time.compute * 4 / 3)


def test_calibrate_from_a_run_directory(tmp_path):
    from polytrain.config import config_to_toml, load_config
    from polytrain.plan.flops import flops_per_token
    from tests.conftest import EXAMPLES

    config = load_config(EXAMPLES / "sft_tiny.toml")
    (tmp_path / "config.toml").write_text(config_to_toml(config))
    records = [{"step": s, "loss": 1.0, "tokens_per_s": 1000.0 if s < 3 else 20000.0} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"layout": "2 processes: dp_replicate 1 x dp_shard 2"}))
    chip, note = calibrate(str(tmp_path), load_chip("cpu"))
    per_device = 20000.0 * flops_per_token(config.model, config.data.max_seq_len).total / 2  # warm-up steps skipped
    assert chip.compute_efficiency == pytest.approx(per_device / 1e12, rel=1e-3)
    assert "2 process" in note


def test_model_from_a_toml_file_and_context_parallel_costs_time(tmp_path):
    from polytrain.plan.cli import _model

    path = tmp_path / "model.toml"
    path.write_text('[model]\npreset = "deepseek-v4-flash"\nnum_hidden_layers = 8\ncompress_ratios = [0, 0, 4, 128, '
                    '4, 128, 4, 128, 0]\n')
    config = _model(str(path))
    assert config.num_hidden_layers == 8 and config.hidden_size == 4096
    job = Job(config, 65536, 65536 * 64)
    plain = evaluate(job, Layout(dp=64, ep=64, recompute="full"), load_chip("h100"))
    split = evaluate(job, Layout(dp=16, cp=4, ep=64, recompute="full"), load_chip("h100"))
    assert split.time.tensor_parallel > 0 and split.memory.activations < plain.memory.activations


def test_when_the_fastest_layout_is_not_runnable_the_report_also_breaks_down_the_best_runnable_one():
    """GRPO on V3-671B: the fastest layouts are pipelines GRPO does not run; the report says so and then gives the
    layout --emit-config writes."""
    from polytrain.plan.report import layout_cell, render

    job, chip = Job(preset("deepseek-v3-671b"), 3072, 256 * 8 * 3072, algorithm="grpo"), load_chip("ascend-910c")
    result = search(job, 256, chip)
    assert result.plans[0].engine_gaps
    runnable = next(p for p in result.plans if not p.engine_gaps)
    text = render(job, chip, 256, result, top=3)
    assert "not yet in polytrain's engine: pipeline parallelism for grpo" in text
    assert f"best that polytrain runs: {layout_cell(runnable.layout)}," in text
