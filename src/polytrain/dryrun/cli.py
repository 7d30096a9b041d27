"""`polytrain dryrun`: the command line of the dry run."""

from __future__ import annotations

import argparse
import json
import sys

from polytrain.errors import PolytrainError

EPILOG = """\
examples:
  polytrain dryrun examples/sft_tiny.toml --world-size 4 --set parallel.dp_shard=4
  polytrain dryrun examples/scale/deepseek_v3_671b_1024.toml --world-size 1024
  polytrain dryrun examples/scale/deepseek_v3_671b_1024.toml --world-size 1024 --rank 960 --json
  polytrain dryrun examples/scale/deepseek_v3_671b_1024.toml --world-size 1024 --algorithm grpo

One training step of the job (its real model size, its [parallel] layout on WORLD_SIZE ranks) runs in this one
CPU process on tensors without storage, through the engine's own code: a layout the engine refuses fails here with
the engine's error. For each chosen rank (default: one per distinct role, e.g. the first and the last pipeline
stage) it reports peak memory by category and the collectives the rank issues (count and bytes by mesh dimension).
The data is made up (every sample at data.max_seq_len), expert routing is perfectly balanced, and [init] weights
are not read. For grpo and distill it runs the update step on made-up rollouts (every completion
max_new_tokens long), not the sampling.
"""

def size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("dryrun", help="one training step at real size and world size, in one process",
                                 description="Run one training step of a job for one or more ranks of a fake "
                                 "world and report their memory and collectives.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="job config (TOML)")
    parser.add_argument("--algorithm", metavar="NAME", help="the objective whose step to run (sft, dpo, rm, grpo, "
                        "distill; default: the config's run.algorithm, else sft)")
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="ranks of the job")
    parser.add_argument("--rank", type=int, action="append", metavar="R", help="a rank to report (repeatable; "
                        "default: one per distinct role)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")


def report_text(reports: list, world: int) -> str:
    lines = []
    for report in reports:
        lines.append(f"rank {report.rank} of {world} ({report.role}), {report.seconds:.1f} s")
        lines.append(f"  parameters {size(report.parameter_bytes)}, optimizer state {size(report.optimizer_bytes)}; "
                     f"peak {size(report.peak_bytes)}:")
        lines.append("    " + ", ".join(f"{name} {size(n)}" for name, n in report.peak_by_category.items()))
        if report.device_peak_bytes is not None:
            lines.append(f"  on the device (cpu_offload keeps the sharded parameters, their gradients and the "
                         f"optimizer state in host memory): peak {size(report.device_peak_bytes)}")
        lines.append("  collectives (calls, bytes of their buffers on this rank):")
        lines += [f"    {call['group']:<14}{call['op']:<24}{call['count']:>6}  {size(call['bytes']):>12}"
                  for call in report.collectives]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from polytrain.config import load_config
    from polytrain.dryrun.run import dry_run

    if args.world_size < 1:
        raise PolytrainError(f"--world-size must be at least 1, got {args.world_size}")
    algorithm = [f'run.algorithm="{args.algorithm}"'] if args.algorithm else []
    config = load_config(args.config, [*algorithm, *args.overrides])
    reports = dry_run(config, args.world_size, args.rank, progress=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print(report_text(reports, args.world_size))
    return 0
