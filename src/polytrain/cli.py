"""`polytrain` command line: argument parsing only; every command calls into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from typing import NoReturn

from polytrain import __version__
from polytrain.audit import cli as audit_cli
from polytrain.backends import DEVICE_CHOICES
from polytrain.dryrun import cli as dryrun_cli
from polytrain.errors import PolytrainError
from polytrain.objectives import registry
from polytrain.plan import cli as plan_cli

BENCH_EPILOG = """\
Runs the job's real training step (same Trainer, layout and precision as `polytrain sft|dpo|... CONFIG`) in a
temporary run directory: --warmup untimed steps, then --steps timed ones. MFU is model FLOPs (polytrain.plan.flops,
no recomputation counted) over the peak: a measured large-matmul peak unless --peak-flops gives the spec figure.
Multi-device: launch with torchrun like any job. Figures are for the whole job; rank 0 prints and writes them.
examples:
  polytrain bench examples/sft_tiny.toml --steps 20 --json runs/bench_cpu.json
  polytrain bench examples/sft_tiny.toml --set run.precision=bf16 --json runs/bench_bf16.json
  polytrain bench --compare runs/bench_cpu.json runs/bench_bf16.json
"""

GENERATE_EPILOG = """\
examples:
  polytrain generate runs/tiny --prompt "What is 12 + 30?"
  polytrain generate runs/tiny --prompt "Reverse: kqzt" --temperature 0.8 --top-p 0.9 --seed 1
"""


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                        help="device backend (overrides run.device; default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytrain",
        description="Full-parameter post-training of DeepSeek-style MoE LLMs on NPU, GPU or CPU with one code path.",
    )
    parser.add_argument("--version", action="version", version=f"polytrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for objective in registry.entries():
        name = objective.name
        train = commands.add_parser(name, help=objective.summary, description=objective.description,
                                    epilog=objective.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        train.add_argument("config", nargs="?", help="job config (TOML)")
        train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override one config value, e.g. --set train.lr=3e-4 (repeatable)")
        train.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its "
                           "newest valid checkpoint; refuses (exit 2) if there is none")
        train.add_argument("--resume-or-start", action="store_true", help="continue the run in run.output_dir if "
                           "it has a valid checkpoint, else start it (job scripts submitted again as they are)")
        train.add_argument("--overwrite", action="store_true", help="delete the run already in run.output_dir first")
        train.add_argument("--stop-at-step", type=int, metavar="N", help="save a checkpoint and exit cleanly after "
                           "step N (e.g. to fit a scheduler's time slot); continue later with --resume")
        train.add_argument("--help-config", action="store_true", help="print every config key this verb reads, "
                           "with its type, default and meaning")
        train.add_argument("--all", action="store_true", help="with --help-config: every verb's section and every "
                           "model family's own keys too")
        train.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
        for flag in objective.flags:
            train.add_argument(flag.name, metavar=flag.metavar, help=flag.help)
        _add_device(train)

    bench = commands.add_parser("bench", help="measure a job's training throughput, MFU and memory",
                                description="Measure tokens/s, step time, FLOP/s, MFU and peak memory of a job.",
                                epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("config", nargs="?", help="job config (TOML); run.algorithm picks the objective (sft default)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value (repeatable)")
    bench.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--peak-flops", type=float, metavar="FLOP/S", help="peak of the whole job for MFU (default: "
                       "a measured matmul peak x devices)")
    bench.add_argument("--json", metavar="OUT", help="also write every figure to OUT (JSON; what --compare reads)")
    bench.add_argument("--compare", nargs="+", metavar="RESULT.json", help="print bench results side by side (no "
                       "run)")
    _add_device(bench)

    gen = commands.add_parser("generate", help="sample answers from a trained run",
                              description="Answer prompts with the newest checkpoint of a run (KV-cache sampler).",
                              epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("run_dir", help="run directory written by `polytrain sft`")
    gen.add_argument("--prompt", action="append", required=True, help="a user message (repeatable: one batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", help="a checkpoint directory (default: the run's newest)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_device(gen)

    plot = commands.add_parser("plot", help="draw a run's loss curves to PNG",
                               description="Plot train / eval loss, learning rate and gradient norm of a run.")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")

    model = commands.add_parser("model", help="inspect model architectures",
                                description="Inspect a preset, a config.json or a Hugging Face model directory.")
    model_commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = model_commands.add_parser(
        "info", help="parameter counts by component, total and activated per token (no memory used)",
        description="Parameter counts by component, total and activated per token, compared with the published "
        "figures for the released sizes. Counting uses the meta device: nothing is allocated.",
        epilog="examples:\n  polytrain model info deepseek-v4-pro\n  polytrain model info path/to/config.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("model", help="preset name, config.json, or a directory holding one")
    info.add_argument("--json", action="store_true", help="print JSON")

    convert = commands.add_parser(
        "convert", help="dequantise an FP8 / FP4 Hugging Face checkpoint to bf16 / fp32, shard by shard",
        description="Dequantise a released DeepSeek checkpoint (FP8 E4M3 128x128 block scales; MXFP4 experts) into "
        "plain bf16 or fp32 safetensors, one shard and one tensor at a time (peak memory about one tensor). The "
        "output is written to OUT.partial/ and renamed to OUT only when complete.")
    convert.add_argument("source", help="Hugging Face model directory (config.json + safetensors)")
    convert.add_argument("out", help="output directory")
    convert.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    export = commands.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face model directory",
        description="Write a checkpoint of a run as Hugging Face safetensors shards + index + config.json "
        "(release naming; transformers loads it: a reward-model run as the family's sequence-classification model) "
        "+ the run's tokenizer.json, tokenizer_config.json with its chat template as Jinja, and "
        "generation_config.json, streaming one tensor at a time from the sharded checkpoint (peak memory about "
        "the largest tensor, whatever the model size).")
    export.add_argument("run_dir")
    export.add_argument("out", help="output directory")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    export.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard size in GiB")
    export.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (each holds "
                        "one tensor at a time)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    plan_cli.add_parser(commands)
    dryrun_cli.add_parser(commands)
    audit_cli.add_parser(commands)
    return parser


def _config_reference(verb: str, everything: bool) -> str:
    """Every key `polytrain VERB` reads, with type, default and meaning; `everything`: every verb's section and every
    model family's own [model] keys too."""
    from polytrain.config import JobConfig
    from polytrain.models.registry import PRESETS, families, spec_for_architecture
    from polytrain.schema import describe

    def rows(entries: list[tuple[str, str, str, str]], defaults: bool = True) -> list[str]:
        out = []
        for key, type_name, default, help_text in entries:
            out.append(f"  {key}  ({type_name}, default {default})" if defaults else f"  {key}  ({type_name})")
            out.extend(textwrap.wrap(help_text, 100, initial_indent="      ", subsequent_indent="      "))
        return out

    lines = ["Job config keys (TOML sections = the part before the first dot):", ""]
    lines += rows([row for row in describe(JobConfig) if not row[0].startswith("model.")])
    for objective in registry.entries():
        section = registry.section_class(objective.name)
        if section is not None and (everything or objective.name == verb):
            lines += ["", f"[{objective.name}]: read by `polytrain {objective.name}`.", ""]
            lines += rows(describe(section, objective.name))
    lines += ["", f"[model]: `preset` = one of {', '.join(PRESETS)}; any field below overrides the preset.", ""]
    lines += rows([row for row in describe(JobConfig) if row[0].startswith("model.")], defaults=False)
    if not everything:
        lines += ["", f"Each model family ({', '.join(families())}) takes its own [model] keys too, and the other "
                  f"verbs their own sections: polytrain {verb} --help-config --all"]
        return "\n".join(lines)
    for family in families():
        spec = spec_for_architecture(family)
        shared = {row[0] for row in describe(JobConfig) if row[0].startswith("model.")}
        own = [row for row in describe(spec.config_class, "model") if row[0] not in shared]
        lines += ["", f"[model] of architecture = \"{family}\" ({spec.description}) also takes:", ""]
        lines += rows(own, defaults=False)
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    from polytrain.config import config_to_toml, load_config

    if args.help_config:
        print(_config_reference(args.command, args.all))
        return 0
    if not args.config:
        raise PolytrainError(f"polytrain {args.command}: give a job config (TOML), e.g. "
                             f"`polytrain {args.command} examples/{args.command}_tiny.toml`")
    overrides = [f'run.algorithm="{args.command}"', *args.overrides]
    overrides += [f'run.device="{args.device}"'] if args.device else []
    config = load_config(args.config, overrides)
    if args.print_config:
        print(config_to_toml(config), end="")
        return 0
    from polytrain.train.trainer import Trainer

    trainer = Trainer(config, resume="or-start" if args.resume_or_start else args.resume, overwrite=args.overwrite,
                      stop_at_step=args.stop_at_step)
    for flag in registry.entry(args.command).flags:
        value = getattr(args, flag.name.lstrip("-").replace("-", "_"))
        if value is not None:
            print(json.dumps(getattr(trainer.objective, flag.method)(value)))
            return 0
    print(json.dumps(trainer.run(), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polytrain.config import load_config

    if args.compare:
        from polytrain.bench.compare import compare_table

        print(compare_table(args.compare))
        return 0
    if not args.config:
        raise PolytrainError("polytrain bench: give a job config (TOML), e.g. `polytrain bench examples/sft_tiny.toml`"
                             ", or --compare A.json B.json")
    overrides = [*args.overrides, *([f'run.device="{args.device}"'] if args.device else [])]
    config = load_config(args.config, overrides)
    from polytrain.bench.runner import bench_job

    result = bench_job(config, args.steps, args.warmup, args.peak_flops,
                       progress=lambda line: print(line, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    from polytrain.bench.compare import results_table

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(results_table([result], [Path(args.config).stem]))
    if args.json:
        print(f"figures: {args.json}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from polytrain.rollout.generate import SamplingConfig
    from polytrain.train.chat import RunChat

    if args.max_new_tokens < 1:
        raise PolytrainError("--max-new-tokens must be >= 1")
    if not 0 < args.top_p <= 1:
        raise PolytrainError("--top-p must be in (0, 1]")
    if args.temperature < 0:
        raise PolytrainError("--temperature must be >= 0")
    chat = RunChat(args.run_dir, args.device or "auto", args.checkpoint)
    if chat.config.run.algorithm == "rm":
        print(f"warning: {args.run_dir} is a reward-model run: its language-model head was not trained with the "
              "rest of the model, so the text below is not the model's", file=sys.stderr)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    for prompt, answer in zip(args.prompt, chat.answer(args.prompt, sampling)):
        if args.json:
            print(json.dumps({"prompt": prompt, "answer": answer, "step": chat.step}))
        else:
            print(f"> {prompt}\n{answer}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from polytrain.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from polytrain.models.info import format_info, model_info

    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from polytrain.models.hf.checkpoint import convert_checkpoint

    def progress(file: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {file}", file=sys.stderr)

    stats = convert_checkpoint(args.source, args.out, getattr(torch, DTYPES[args.dtype]), args.overwrite, progress)
    print(json.dumps({"out": args.out, **stats}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from polytrain.train.export import export_run

    out, step = export_run(args.run_dir, args.out, args.step, getattr(torch, DTYPES[args.dtype]),
                           int(args.max_shard_gb * 2**30), args.overwrite, args.workers)
    print(json.dumps({"out": str(out), "step": step}))
    return 0


TOOLS = {"bench": _cmd_bench, "generate": _cmd_generate, "plot": _cmd_plot, "model": _cmd_model,
         "convert": _cmd_convert, "export": _cmd_export, "plan": plan_cli.run, "dryrun": dryrun_cli.run,
         "audit": audit_cli.run}


def entry() -> NoReturn:
    """The `polytrain` command and `python -m polytrain`: `main`, then out of the process; a process that ran
    collectives leaves through `parallel.runtime.exit_process` (imported only then: it imports torch), also after
    an error `main` does not turn into an exit status (printed with its traceback: exit status 1)."""
    try:
        code = main()
    except SystemExit:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint is written
        print("interrupted", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    runtime = sys.modules.get("polytrain.parallel.runtime")
    if runtime is None:
        raise SystemExit(code)
    runtime.exit_process(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from polytrain.train.signals import TrainingInterrupted

    try:
        return TOOLS.get(args.command, _cmd_train)(args)
    except PolytrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr)
        return 130
