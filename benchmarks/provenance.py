"""Where a benchmark result comes from: the commit, the date and the machine, written into every results file.

Each benchmark keeps one results file (`benchmarks/results/<name>.json`, the latest run); its history is git's.

Usage (stamp a file written by another tool, e.g. `polytrain bench --json`):
    python benchmarks/provenance.py benchmarks/results/bench_cpu_tiny.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checked-out commit, with `-dirty` when tracked files other than results differ from it ("unknown"
    outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def machine() -> str:
    """CPU model, cores, memory, Python and torch versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        total_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:"))
        memory = f", {total_kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        memory = ""
    try:
        import torch

        torch_version = f", torch {torch.__version__}"
    except ImportError:
        torch_version = ""
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}{torch_version}"


def stamp(data: dict[str, Any]) -> dict[str, Any]:
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {**data, "commit": commit(), "date": date, "machine": machine()}


def write_results(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` with its provenance as the benchmark's one results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp(data), indent=2) + "\n")
    return path


if __name__ == "__main__":
    for name in sys.argv[1:]:
        write_results(name, json.loads(Path(name).read_text()))
