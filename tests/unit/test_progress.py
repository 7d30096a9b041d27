"""Progress lines without a terminal, the MFU's chip lookup, and the per-objective plot."""

from __future__ import annotations

import json

import pytest

from polytrain.backends.base import MemoryStats
from polytrain.objectives.base import Metric
from polytrain.plan.hardware import chip_for_device_name
from polytrain.train.progress import Progress, Throughput, format_duration

GIB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kwargs) -> Progress:
    defaults = dict(total_steps=200, start_step=0, headline=(Metric("reward", "reward"), Metric("kl", "KL")),
                    flops_per_token=6e9, peak_flops=None, every_steps=0, every_s=60.0, clock=clock)
    return Progress(**{**defaults, **kwargs})


def test_lines_come_every_5_percent_every_n_seconds_and_on_first_last_and_guard_steps():
    clock = Clock()
    progress = make(clock)
    assert progress.every_steps == 10
    due = [step for step in range(1, 201) if progress.due(step)]
    assert due == [1, *range(10, 201, 10)]
    assert progress.due(7, force=True)
    clock.now += 61  # a slow run: a line once a minute whatever the step
    assert progress.due(7)
    progress.line(7, {"loss": 1.0, "lr": 1e-4, "grad_norm": 1.0}, MemoryStats(0, 0, 0, 0, GIB), False)
    assert not progress.due(8)
    assert [s for s in range(1, 40) if make(clock, every_steps=4, every_s=0).due(s)] == [1, *range(4, 40, 4)]


def test_line_has_headline_smoothed_throughput_mfu_memory_elapsed_and_eta():
    clock = Clock()
    progress = make(clock, start_step=100, peak_flops=8 * 100e12)
    for seconds, tokens in ((30.0, 1000), (2.0, 4000), (2.0, 4000)):  # a slow first step, then steady ones
        clock.now += seconds
        progress.step_done(seconds, tokens)
    memory = MemoryStats(0, int(12.5 * GIB), 0, 0, int(3.2 * GIB))
    stats = {"loss": 0.25, "reward": 0.625, "kl": 0.0123, "lr": 3e-5, "grad_norm": 0.5}
    line = progress.line(103, stats, memory, device_memory=True)
    tokens_per_s = 9000 / 34
    assert line.startswith("step 103/200 (52%) | reward 0.6250, KL 0.0123, loss 0.2500 | lr 3.00e-05 |")
    assert f"{tokens_per_s:,.0f} tok/s" in line
    assert f"MFU {tokens_per_s * 6e9 / 800e12:.1%}" in line
    assert "mem 12.5 GiB device, 3.2 GiB host" in line
    assert "elapsed 34s" in line and f"ETA {format_duration(97 * 34 / 3)}" in line
    assert "MFU" not in make(clock).line(1, stats, memory, device_memory=False)
    assert "ETA" not in progress.line(200, stats, memory, False)


def test_throughput_forgets_steps_beyond_its_window():
    throughput = Throughput(window=3)
    for seconds, tokens in ((100.0, 10), (1.0, 100), (1.0, 100), (1.0, 100)):
        throughput.add(seconds, tokens)
    assert throughput.tokens_per_s == 100.0 and throughput.step_seconds == 1.0


@pytest.mark.parametrize(("seconds", "text"), [(12.4, "12s"), (250, "4m10s"), (7500, "2h05m"), (3 * 86400 + 4 * 3600,
                                                                                             "3d04h")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("device_name", "chip"), [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H800", "h800"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("Ascend910B2", "ascend-910b"), ("Ascend910_9392", "ascend-910c-die"),
    ("NVIDIA H100 PCIe", None), ("Ascend910B3", None), (None, None),
])
def test_mfu_peak_comes_from_the_device_name_only_when_it_pins_the_chip_down(device_name, chip):
    found = chip_for_device_name(device_name)
    assert (found.name if found else None) == chip


def test_plot_draws_each_headline_metric_of_the_runs_objective(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from polytrain.objectives.grpo import GRPOObjective
    from polytrain.train.plot import plot_run

    records = [{"step": 0, "eval_reward": 0.1}] + [
        {"step": s, "loss": 0.1, "lr": 1e-5, "grad_norm": 1.0, "reward": 0.1 * s, "reward_std": 0.2,
         "completion_len": 30.0, "clip_fraction": 0.01} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    subplots = plt.subplots

    def keep_axes(*args, **kwargs):
        fig, axes = subplots(*args, **kwargs)
        drawn.append(axes)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", keep_axes)
    assert plot_run(tmp_path, objective=GRPOObjective).stat().st_size > 10_000
    titles = [ax.get_title() for ax in drawn[0].flat if ax.get_visible()]
    # KL was never logged (no reference model): no empty panel for it
    assert titles == ["loss", "reward", "reward std", "response len", "clip", "learning rate",
                      "gradient norm (pre-clip)"]
    assert drawn[0].flat[0].get_ylabel() == GRPOObjective.loss_label
    assert [line.get_label() for line in drawn[0].flat[1].get_lines()] == ["train", "eval"]
