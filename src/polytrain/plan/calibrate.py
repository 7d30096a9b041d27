"""Calibration: set a chip's compute efficiency from a measurement (a `polytrain bench --json` result, or a
polytrain run directory), and write it as a user chip file."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from polytrain.errors import ConfigError
from polytrain.plan.flops import flops_per_token
from polytrain.plan.hardware import Chip


def _from_bench(data: dict, chip: Chip) -> tuple[float, str]:
    """`polytrain bench --json`: achieved_flops_per_s and tokens_per_s are for the whole job (its peak is the
    per-device peak x world_size), so per device they are divided by world_size."""
    missing = [k for k in ("achieved_flops_per_s", "world_size") if k not in data]
    if missing:
        raise ConfigError(f"bench result lacks {', '.join(missing)} (expected `polytrain bench --json` output)")
    world = max(1, int(data["world_size"]))
    achieved = float(data["achieved_flops_per_s"]) / world
    note = (f"polytrain bench on {data.get('device', '?')} ({data.get('backend', '?')}, {world} process(es)): "
            f"{achieved / 1e12:.3g} TFLOP/s per device, {data.get('tokens_per_s', 0):,.0f} tokens/s in all")
    return achieved, note


def _from_run(run_dir: Path, chip: Chip) -> tuple[float, str]:
    from polytrain.config import load_config
    from polytrain.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    if len(records) < 2:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds fewer than 2 steps with tokens_per_s; train longer")
    steady = records[len(records) // 2:]  # skip warm-up and compilation
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    config = load_config(run_dir / "config.toml")
    world = 1
    summary = run_dir / "summary.json"
    if summary.is_file():
        layout = json.loads(summary.read_text()).get("layout", "")
        if layout.split(" ")[0].isdigit():
            world = int(layout.split(" ")[0])
    seq = config.data.max_seq_len
    per_token = flops_per_token(config.model, seq).total
    achieved = tokens_per_s * per_token / world
    note = (f"run {run_dir}: median {tokens_per_s:,.0f} tokens/s over steps {steady[0]['step']}-{steady[-1]['step']}"
            f" on {world} process(es), {per_token / 1e9:.3g} GFLOP/token at seq {seq} (an upper bound on the "
            "sequence length: packed rows are full, padded ones are not)")
    return achieved, note


def calibrate(source: str, chip: Chip) -> tuple[Chip, str]:
    """The chip with compute_efficiency = measured FLOP/s per device / the chip's BF16 peak."""
    path = Path(source)
    if path.is_dir():
        achieved, note = _from_run(path, chip)
    elif path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object from `polytrain bench --json`")
        achieved, note = _from_bench(data, chip)
    else:
        raise ConfigError(f"calibration source not found: {source} (a `polytrain bench --json` file or a run dir)")
    efficiency = achieved / chip.peak_flops("bf16")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"measured {achieved / 1e12:.3g} TFLOP/s per device is {efficiency:.1%} of the "
                          f"{chip.name} BF16 peak ({chip.bf16_tflops:g} TFLOPS): wrong --hardware for this result?")
    sources = {**chip.sources, "compute_efficiency": f"calibrated: {note}"}
    return replace(chip, compute_efficiency=round(efficiency, 4), sources=sources), note
