"""Speed of `polytrain audit` on real code: the installed torch and transformers packages' Python files.

Audits each package directory (found through importlib) with the shipped rules and reports files, lines, how many
files were parsed (the others contain no rule's trigger word, so the text pre-filter counts them as scanned without
a libcst parse; see polytrain/audit/engine.py), findings by severity, files that did not parse, wall time and lines
per second, and the CPU time spent (this process and its workers): lines per CPU-second does not depend on what
else runs on the machine, wall-clock lines per second does. Nothing is written to the packages (no --fix).
`--no-prefilter` parses every file.

Usage: python benchmarks/audit_speed.py [--jobs N] [--packages torch transformers] [--no-prefilter]
                                        [--out benchmarks/results/audit_speed.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs="+", default=["torch", "transformers"])
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPUs available)")
    parser.add_argument("--no-prefilter", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/audit_speed.json")
    args = parser.parse_args()

    from polytrain.audit import audit_paths

    jobs = args.jobs or len(os.sched_getaffinity(0))
    rows = []
    for name in args.packages:
        root = package_dir(name)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        result = audit_paths([str(root)], jobs=jobs, prefilter=not args.no_prefilter)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        counts = result.counts()
        parsed_lines = sum(r.lines for r in result.files if r.parsed)
        row = {"package": name, "version": getattr(sys.modules.get(name) or __import__(name), "__version__", "?"),
               "files": counts["files"], "lines": counts["lines"], "parsed_files": counts["parsed"],
               "parsed_lines": parsed_lines, "not_parsed": counts["not_parsed"],
               "findings": {s: counts[s] for s in ("blocker", "manual", "auto-fix", "portable")},
               "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
               "lines_per_s": round(counts["lines"] / seconds), "lines_per_cpu_s": round(counts["lines"] / cpu),
               "parsed_lines_per_s": round(parsed_lines / seconds)}
        rows.append(row)
        print(json.dumps(row))
    lines = sum(r["lines"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    result = {"benchmark": "audit_speed", "jobs": jobs, "cpus": os.cpu_count(), "prefilter": not args.no_prefilter,
              "rows": rows, "total_lines": lines, "total_seconds": round(seconds, 2),
              "lines_per_s": round(lines / seconds), "total_cpu_seconds": round(cpu, 2),
              "lines_per_cpu_s": round(lines / cpu),
              "command": " ".join(["benchmarks/audit_speed.py", *sys.argv[1:]]),
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(f"{lines:,} lines in {seconds:.1f} s with {jobs} processes: {result['lines_per_s']:,} lines/s "
          f"({result['lines_per_cpu_s']:,} lines per CPU-second) -> {args.out}")


if __name__ == "__main__":
    main()
