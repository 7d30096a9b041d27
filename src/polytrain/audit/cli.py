"""`polytrain audit`: its arguments and what the command does (polytrain/cli.py only registers it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polytrain.errors import ConfigError, PolytrainError

DESCRIPTION = """\
Find the NVIDIA-only code in a Python code base (torch.cuda calls, .cuda(), "cuda" device strings, "nccl",
torch.cuda.amp, CUDA-only packages such as flash-attn / apex / DeepEP, CUDA extensions and .cu files, CUDA graphs,
NCCL / CUDA environment variables), say how bad each finding is and what replaces it, and rewrite the mechanical
ones so the code runs on any accelerator, or on the CPU.

severities:
  blocker   no equivalent off NVIDIA: needs a rewrite or a kernel of its own (.cu files, CUDAExtension, cupy)
  manual    a replacement exists and a person applies it (flash_attn -> scaled_dot_product_attention)
  auto-fix  mechanical: --fix rewrites it (.cuda() -> .to(device), torch.cuda.amp -> torch.amp, "nccl" -> the
            device's default backend)
  portable  works as is: hygiene, or an optional import under try/except ImportError"""

EPILOG = """\
examples:
  polytrain audit train.py src/                  # report, grouped by severity
  polytrain audit src/ --diff                    # show the rewrites --fix would make, change nothing
  polytrain audit src/ --fix                     # rewrite in place (run it twice: the second changes nothing)
  polytrain audit src/ --target npu              # add the Ascend (torch_npu) equivalent to every finding
  polytrain audit src/ --fix --target npu        # rewrite to Ascend-only torch_npu code instead
  polytrain audit src/ --format sarif -o audit.sarif    # for code-review tools (GitHub code scanning, ...)
  polytrain audit src/ --format json --fail-on never    # for scripts; exit 0 whatever is found
  polytrain audit src/ --select PA1,PA201 --ignore PA116
  polytrain audit --list-rules

--fix defines the device once, after the imports it needs:
  device = torch.accelerator.current_accelerator() or torch.device("cpu")
and rewrites through it. A test on the platform (torch.cuda.is_available(), device == "cuda") is rewritten with
everything it guards or not at all; code that already branches per device (an "npu" case) is left alone. Each
rewritten file must compile and leave no name unbound, else it is left unchanged and reported (PA001); files are
written only when all of them can be. The report after --fix shows the rewritten files' line numbers. Review the
diff like any other change. Files are parsed in parallel (--jobs); a file that does not parse is reported (PA000)
and the run continues.
exit status: 0 nothing at or above --fail-on, 1 something is, 2 bad input (missing path, unknown rule)."""

FAIL_ON = ("blocker", "manual", "auto-fix", "portable", "never")


def add_parser(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser("audit", help="find NVIDIA-only code; rewrite what can be made portable",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("paths", nargs="*", metavar="PATH", help="Python files, .cu / .cuh / .sh files, directories")
    audit.add_argument("--fix", action="store_true", help="rewrite the auto-fixable findings in place")
    audit.add_argument("--diff", action="store_true", help="print the rewrites as a unified diff (without --fix: "
                       "nothing is written)")
    audit.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="report format "
                       "(default: text)")
    audit.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")
    audit.add_argument("--target", choices=_targets(), help="also give the Ascend (torch_npu) equivalents; with "
                       "--fix, rewrite to Ascend-only torch_npu code (default: device-agnostic code)")
    audit.add_argument("--fail-on", choices=FAIL_ON, default="blocker", help="exit 1 when a finding of this "
                       "severity or worse remains (default: blocker; never: always exit 0)")
    audit.add_argument("--jobs", "-j", type=int, metavar="N", help="worker processes (default: the CPUs available)")
    audit.add_argument("--select", action="append", default=[], metavar="RULES", help="only these rules: ids, id "
                       "prefixes or names, comma-separated (repeatable)")
    audit.add_argument("--ignore", action="append", default=[], metavar="RULES", help="skip these rules (same form)")
    audit.add_argument("--no-prefilter", action="store_true", help="parse every file, even those without any "
                       "trigger word (slower; same findings)")
    audit.add_argument("--list-rules", action="store_true", help="print the rules and exit")


def _targets() -> tuple[str, ...]:
    from polytrain.audit.rules import load_rules

    return load_rules().targets


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    from polytrain.audit.engine import audit_paths, write_fixes
    from polytrain.audit.report import json_report, rules_table, sarif_report, summary_line, text_report, unified_diff
    from polytrain.audit.rules import SEVERITIES, load_rules

    rules = load_rules().select(_split(args.select), _split(args.ignore))
    if args.list_rules:
        print(rules_table(rules), end="")
        return 0
    if not args.paths:
        raise ConfigError("polytrain audit: give one or more files or directories, e.g. `polytrain audit train.py`")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    result = audit_paths(args.paths, rules, fix=args.fix or args.diff, jobs=args.jobs,
                         prefilter=not args.no_prefilter, target=args.target)
    if args.diff:
        print(unified_diff(result), end="")
    if args.fix:
        write_fixes(result)
        result = result.as_written()  # what is still open, at the rewritten files' line numbers
    else:  # --diff alone: nothing was written, so nothing counts as fixed
        for finding in result.findings:
            finding.fixed = False
    if args.format == "json":
        report = json_report(result, args.target)
    elif args.format == "sarif":
        report = sarif_report(result, rules, args.target)
    else:
        report = text_report(result, args.target)
    if args.output:
        try:
            Path(args.output).write_text(report, encoding="utf-8")
        except OSError as err:
            raise PolytrainError(f"cannot write the report to {args.output}: {err.strerror}") from err
        print(summary_line(result), file=sys.stderr)
    elif args.diff:
        print(summary_line(result), file=sys.stderr)
    else:
        print(report, end="")
    if args.fail_on == "never":
        return 0
    worst = SEVERITIES.index(args.fail_on)
    return int(any(not f.fixed and SEVERITIES.index(f.severity) >= worst for f in result.findings))
