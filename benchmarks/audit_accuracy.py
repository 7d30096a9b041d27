"""Precision and recall of `polytrain audit` on a corpus whose NVIDIA-only lines are marked by hand.

The corpus (default: examples/audit_corpus/: a single-GPU script, a DDP script configured nanoGPT-style, a
mixed-precision script, a device-dispatch module that already handles Ascend and a launch script) marks each line
that ties the code to NVIDIA (it fails, or silently does something else, off NVIDIA) with the comment `[cuda-only]`.
A line counts as flagged when the audit reports a finding on it that is not `portable` (`portable` findings say
the code works as is). Precision: flagged lines that are marked / flagged lines; recall: marked lines that are
flagged / marked lines. Lines flagged but not marked, and marked but not flagged, are listed.

Usage: python benchmarks/audit_accuracy.py [--corpus examples/audit_corpus]
                                           [--out benchmarks/results/audit_accuracy.json | -]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py

MARK = "[cuda-only]"


def score(corpus: Path) -> dict:
    from polytrain.audit import audit_paths

    result = audit_paths([str(corpus)], jobs=1)
    flagged = {(Path(f.path).relative_to(corpus).as_posix(), f.line) for f in result.findings
               if f.severity != "portable"}
    marked = set()
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MARK in line:
                marked.add((path.relative_to(corpus).as_posix(), number))
    hits = flagged & marked
    counts = result.counts()
    return {"corpus": corpus.as_posix(), "files": counts["files"], "lines": counts["lines"],
            "marked_lines": len(marked), "flagged_lines": len(flagged), "true_positives": len(hits),
            "precision": round(len(hits) / len(flagged), 3) if flagged else 1.0,
            "recall": round(len(hits) / len(marked), 3) if marked else 1.0,
            "findings": {s: counts[s] for s in ("blocker", "manual", "auto-fix", "portable")},
            "flagged_not_marked": [f"{p}:{n}" for p, n in sorted(flagged - marked)],
            "marked_not_flagged": [f"{p}:{n}" for p, n in sorted(marked - flagged)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="examples/audit_corpus")
    parser.add_argument("--out", default="benchmarks/results/audit_accuracy.json")
    args = parser.parse_args()
    row = score(Path(args.corpus))
    result = {"benchmark": "audit_accuracy", **row,
              "command": " ".join(["benchmarks/audit_accuracy.py", *sys.argv[1:]])}
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, result)
    print(json.dumps(row, indent=2))
    print(f"precision {row['precision']:.3f} ({row['true_positives']}/{row['flagged_lines']} flagged lines), "
          f"recall {row['recall']:.3f} ({row['true_positives']}/{row['marked_lines']} marked lines)"
          + (f" -> {args.out}" if args.out != "-" else ""))


if __name__ == "__main__":
    main()
