"""`polytrain plan`: arguments and the command (the main CLI only registers it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polytrain.errors import ConfigError

EPILOG = """\
examples:
  polytrain plan --model deepseek-v4-pro --hardware ascend-910c --devices 1024 --seq-len 4096 \\
      --global-batch-tokens 16M
  polytrain plan --model deepseek-v3-671b --hardware h800 --devices 256 --global-batch-tokens 4M \\
      --compare-hardware ascend-910b --top 5
  polytrain plan --model deepseek-v4-flash --hardware h100 --devices 64 --global-batch-tokens 2M \\
      --emit-config v4flash.toml          # the best layout polytrain runs, as a job config
  polytrain plan --model deepseek-v3-671b --hardware h800 --devices 2048 --global-batch-tokens 62914560 \\
      --layout pp=16,ep=64,zero=1,schedule=dualpipe,recompute=selective --moments bf16
  polytrain plan --model deepseek-v3-671b --hardware ascend-910b --devices 64 --algorithm grpo --json
  polytrain plan --model deepseek-v3-671b --hardware h100 --devices 256 --algorithm grpo --rollout-devices 64
  polytrain plan --calibrate bench.json --hardware h100 --out my-h100.toml   # then --hardware my-h100.toml
  polytrain plan --list-hardware

--model: a preset, a config.json (or model directory), or a TOML file with a [model] table.
--hardware: a catalogue chip or a chip TOML file (copy one from --list-hardware --json and edit it).
Numbers accept K / M / G suffixes (16M = 16,000,000). Predictions assume balanced expert routing and the stated
efficiencies; calibrate them with a measurement before booking a cluster.
"""


def _count(text: str) -> int:
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
    text = text.strip().lower().replace("_", "").replace(",", "")
    try:
        return int(float(text[:-1]) * scale[text[-1]]) if text and text[-1] in scale else int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="capacity planner: memory, best layouts and predicted throughput for a model on a cluster",
        description="Predict per-device memory, step time, tokens/s and MFU of a training job on a cluster; search "
        "the parallel layouts (TP / PP / EP / DP / CP, ZeRO, offload, recomputation) and rank those that fit.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset, config.json / model directory, or model TOML")
    p.add_argument("--hardware", help="chip name from the catalogue, or a chip TOML file")
    p.add_argument("--devices", type=_count, help="number of devices (GPUs / NPUs, or dies for ascend-910c-die)")
    p.add_argument("--seq-len", type=_count, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--global-batch-tokens", type=_count, default=None,
                   help="tokens per optimizer step over all devices (default: 4M; grpo: samples x (prompt + response))")
    p.add_argument("--algorithm", choices=("sft", "dpo", "grpo"), default="sft")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp8"), default="bf16",
                   help="dtype of the linear layers' matrix products (default bf16; MFU is always over BF16 peak)")
    p.add_argument("--moments", choices=("fp32", "bf16"), default="fp32", help="AdamW moment dtype (default fp32)")
    p.add_argument("--no-mtp", action="store_true", help="train without the model's MTP modules")
    p.add_argument("--prompt-len", type=_count, default=1024, help="grpo: prompt tokens (default 1024)")
    p.add_argument("--response-len", type=_count, default=2048, help="grpo: generated tokens (default 2048)")
    p.add_argument("--rollout-devices", type=_count, default=0,
                   help="grpo: of --devices, how many host the rollout engine apart from the trainer (disaggregated: "
                   "vLLM servers there, grpo.rollout_ranks connecting to them); the training layouts span the rest. "
                   "0 (default): the training devices sample (colocated)")
    p.add_argument("--layout", metavar="K=V,...", help="evaluate this one layout instead of searching, e.g. "
                   "tp=2,pp=8,ep=64,zero=1,offload=optimizer,recompute=full,micro_batch=1,schedule=1f1b "
                   "(dp is what the devices leave)")
    p.add_argument("--any-framework", action="store_true", help="also search layouts polytrain's engine does not "
                   "run yet (ZeRO-1, optimizer-only offload, DualPipe)")
    p.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    p.add_argument("--compare-hardware", metavar="CHIP", help="the same job on a second chip, side by side")
    p.add_argument("--emit-config", metavar="OUT.toml", help="write the best layout polytrain runs as a job config")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-hardware", action="store_true", help="list the chip catalogue and exit")
    p.add_argument("--calibrate", metavar="BENCH.json|RUN_DIR", help="set --hardware's compute efficiency from a "
                   "`polytrain bench --json` result or a run directory; writes --out")
    p.add_argument("--out", metavar="CHIP.toml", help="with --calibrate: the chip file to write")


def _model(spec: str):
    from polytrain.config import read_toml
    from polytrain.models.info import resolve_model
    from polytrain.models.registry import model_config_from_table

    if spec.endswith(".toml"):
        data = read_toml(spec)
        table = data.get("model", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{spec}: `model` must be a table")
        config = model_config_from_table(table)
    else:
        config = resolve_model(spec)
    config.validate()
    return config


def _parse_layout(text: str, devices: int):
    from polytrain.plan.layout import OFFLOAD, RECOMPUTE, SCHEDULES, Layout

    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"--layout expects key=value pairs, got `{item}`")
        key, value = (x.strip() for x in item.split("=", 1))
        if key in ("tp", "pp", "ep", "cp", "zero", "micro_batch", "dp"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--layout {key} must be a positive integer, got `{value}`")
            values[key] = int(value)
        elif key in ("offload", "recompute", "schedule"):
            allowed = {"offload": OFFLOAD, "recompute": RECOMPUTE, "schedule": SCHEDULES}[key]
            if value not in allowed:
                raise ConfigError(f"--layout {key} must be one of {', '.join(allowed)}, got `{value}`")
            values[key] = value
        elif key == "experts_over_tp":
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            raise ConfigError(f"--layout: unknown key `{key}` (tp, pp, ep, cp, dp, zero, offload, recompute, "
                              "micro_batch, schedule, experts_over_tp)")
    split = values.get("tp", 1) * values.get("pp", 1) * values.get("cp", 1)
    if devices % split:
        raise ConfigError(f"--devices {devices} is not divisible by tp x pp x cp = {split}")
    values.setdefault("dp", devices // split)
    layout = Layout(**values)
    if layout.devices != devices:
        raise ConfigError(f"dp x tp x pp x cp = {layout.devices} but --devices is {devices}")
    return layout


def _fit_advice(job, chip, devices: int, result, engine_only: bool) -> str:
    from polytrain.plan.memory import GiB
    from polytrain.plan.search import minimum_devices

    closest = result.closest
    parts = [f"no layout fits {devices} x {chip.name} ({chip.hbm_gb:g} GB each)"]
    if closest is not None:
        host = (f" and {closest.memory.host * chip.devices_per_node / 1e12:.1f} TB host memory per node (of "
                f"{chip.host_memory_gb / 1e3:.3g} TB)" if closest.memory.host else "")
        parts.append(f"the leanest ({closest.layout.short()}, ZeRO-{closest.layout.zero}, offload "
                     f"{closest.layout.offload}, recompute {closest.layout.recompute}) needs "
                     f"{closest.memory.device / GiB:.1f} GiB per device{host}")
    needed = minimum_devices(job, chip, devices * 2, engine_only=engine_only)
    if needed:
        parts.append(f"it fits on {needed} devices")
    if engine_only:
        wider = search_any(job, devices, chip)
        if wider:
            parts.append("it fits here with layouts outside polytrain's engine (--any-framework: ZeRO-1 / "
                         "optimizer offload / DualPipe)")
    if job.seq_len > 4096:
        parts.append("or shorten --seq-len")
    return "; ".join(parts)


def search_any(job, devices, chip) -> bool:
    from polytrain.plan.search import search

    return bool(search(job, devices, chip, engine_only=False).plans)


def run(args: argparse.Namespace) -> int:
    from polytrain.plan.hardware import chip_to_toml, known_chips, load_chip

    if args.list_hardware:
        chips = [load_chip(name) for name in known_chips()]
        if args.json:
            print(json.dumps([{**{k: v for k, v in c.__dict__.items()}} for c in chips], indent=2))
        else:
            print(f"{'chip':<17}{'BF16 TF':>9}{'FP8 TF':>8}{'HBM GB':>8}{'TB/s':>6}{'intra GB/s':>11}"
                  f"{'inter GB/s':>11}{'per node':>9}  description")
            for c in chips:
                print(f"{c.name:<17}{c.bf16_tflops:>9g}{c.fp8_tflops:>8g}{c.hbm_gb:>8g}{c.hbm_tbps:>6g}"
                      f"{c.intra_node_gbps:>11g}{c.inter_node_gbps:>11g}{c.devices_per_node:>9}  {c.description}")
        return 0
    if not args.hardware:
        raise ConfigError("--hardware is required (a chip name: " + ", ".join(known_chips()) + "; or a TOML file)")
    chip = load_chip(args.hardware)
    if args.calibrate:
        from polytrain.plan.calibrate import calibrate

        if not args.out:
            raise ConfigError("--calibrate needs --out CHIP.toml (the calibrated chip file to write)")
        new, note = calibrate(args.calibrate, chip)
        Path(args.out).write_text(chip_to_toml(new, f"{chip.name} calibrated from {note}"), encoding="utf-8")
        print(f"{chip.name}: compute efficiency {chip.compute_efficiency:g} -> {new.compute_efficiency:g} "
              f"({note}); wrote {args.out}")
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--devices", args.devices)) if value is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see polytrain "
                          "plan --help)")
    if args.devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {args.devices}")
    return _plan(args, chip)


def _plan(args: argparse.Namespace, chip) -> int:
    from polytrain.plan.hardware import load_chip
    from polytrain.plan.layout import Job
    from polytrain.plan.report import emit_config, job_summary, plan_dict, render
    from polytrain.plan.search import evaluate, search
    from polytrain.plan.timing import rollout_group

    model = _model(args.model)
    if args.seq_len < 2:
        raise ConfigError("--seq-len must be >= 2")
    default_tokens = 4_000_000
    if args.algorithm == "grpo":
        default_tokens = 256 * 8 * (args.prompt_len + args.response_len)
        seq_len = args.prompt_len + args.response_len
    else:
        seq_len = args.seq_len
    rollout_devices = args.rollout_devices
    if rollout_devices and args.algorithm != "grpo":
        raise ConfigError("--rollout-devices is for --algorithm grpo (the devices that sample its rollouts)")
    if not 0 <= rollout_devices < args.devices:
        raise ConfigError(f"--rollout-devices {rollout_devices} must leave training devices of --devices "
                          f"{args.devices}")
    job = Job(model, seq_len, args.global_batch_tokens or default_tokens, algorithm=args.algorithm,
              precision=args.precision, moment_bytes=2 if args.moments == "bf16" else 4, mtp=not args.no_mtp,
              prompt_len=args.prompt_len, response_len=args.response_len, rollout_devices=rollout_devices)
    devices = args.devices - rollout_devices  # what the training layouts span
    if args.precision != "bf16":
        chip.peak_flops(args.precision)  # fails loudly on a chip without it
    engine_only = not args.any_framework
    chips = [chip] + ([load_chip(args.compare_hardware)] if args.compare_hardware else [])
    outputs = []
    for current in chips:
        if rollout_devices:
            rollout_group(job, current)  # the rollout devices hold the engine, or a one-line error now
        if args.layout:
            plan = evaluate(job, _parse_layout(args.layout, devices), current)
            outputs.append((current, None, [plan]))
            continue
        result = search(job, devices, current, engine_only=engine_only)
        outputs.append((current, result, result.plans))
    if args.json:
        doc = []
        for current, result, plans in outputs:
            entry = {**job_summary(job, current, devices),
                     "plans": [plan_dict(job, p, current) for p in plans[:args.top]]}
            if result is not None:
                entry.update(layouts_searched=result.evaluated, search_seconds=round(result.seconds, 3))
                if not plans and result.closest is not None:
                    entry["closest"] = plan_dict(job, result.closest, current)
            doc.append(entry)
        print(json.dumps(doc[0] if len(doc) == 1 else doc, indent=2))
    else:
        for current, result, plans in outputs:
            if result is None:
                from polytrain.plan.report import breakdown

                print(f"{devices} x {current.name}, {job.model.preset}, seq {job.seq_len}: "
                      f"{'fits' if plans[0].fits else 'DOES NOT FIT'}")
                print(breakdown(job, current, plans[0]))
            else:
                print(render(job, current, devices, result, args.top))
    for current, result, plans in outputs:
        if result is not None and not plans:
            raise ConfigError(f"{current.name}: " + _fit_advice(job, current, devices, result, engine_only))
    if args.emit_config:
        runnable = [p for p in outputs[0][2] if not p.engine_gaps and p.fits]
        if not runnable:
            raise ConfigError("no fitting layout runs on polytrain's engine yet; nothing to emit (see the table's "
                              "`polytrain` column)")
        Path(args.emit_config).write_text(emit_config(job, runnable[0], chip), encoding="utf-8")
        if not args.json:
            print(f"wrote {args.emit_config} ({runnable[0].layout.short()})")
    return 0
