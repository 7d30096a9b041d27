"""Peak host memory of loading an SFT training set: the token store against holding every record and sample.

Writes N short made-up conversations as JSON Lines and as Parquet, then loads each in a fresh process two ways and
reads that process's peak RSS (VmHWM):
  eager:  every record parsed into a list, then every conversation tokenised into a pair of tensors kept in a list
          (how `load_sft_dataset` worked before the token store; kept here as the reference);
  store:  `load_sft_dataset`: records read one at a time, tokens appended to the memory-mapped `TokenStore`.
Each process then reads every sample once, as an epoch does. Reported: the peak RSS (VmHWM) once loaded and after
the epoch, and the anonymous / file-backed split of the RSS after it: the store's pages are file-backed (the kernel
can drop them under memory pressure and read them again), the eager path's tensors are anonymous memory.
Both must produce the same samples. The baseline is a process that has imported polytrain and loaded the tokenizer
(and, for the Parquet rows, imported pyarrow).

Usage: python benchmarks/data_memory.py [--conversations 200000] [--out benchmarks/results/data_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from provenance import write_results  # noqa: E402 - benchmarks/provenance.py

TOKENIZER = ROOT / "examples" / "tokenizer" / "tokenizer.json"
MAX_LEN = 128


def conversation(i: int) -> dict:
    a, b = i % 997, (i * 7) % 1013
    turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if i % 3 == 0:
        turns.insert(0, {"role": "system", "content": "Answer with one sentence."})
    return {"messages": turns}


def write_data(folder: Path, count: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = folder / "train.jsonl"
    with jsonl.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps(conversation(i)) + "\n")
    parquet = folder / "train.parquet"
    writer = None
    for start in range(0, count, 10_000):
        table = pa.Table.from_pylist([conversation(i) for i in range(start, min(count, start + 10_000))])
        writer = writer or pq.ParquetWriter(str(parquet), table.schema)
        writer.write_table(table)
    writer.close()
    return {"jsonl": jsonl, "parquet": parquet}


def child(mode: str, path: str) -> None:
    """Load `path` the `mode` way and print one JSON line: samples, tokens, seconds, peak RSS."""
    from polytrain.backends.base import host_memory
    from polytrain.data.chat import get_template, render
    from polytrain.data.dataset import load_sft_dataset, make_sample
    from polytrain.data.jsonl import load_conversations
    from polytrain.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(TOKENIZER)
    template = get_template("polytrain", tokenizer)
    started = time.perf_counter()
    if mode.startswith("baseline"):
        if mode == "baseline_pyarrow":
            import pyarrow.parquet  # noqa: F401
        samples = []
    elif mode == "eager":
        samples = [make_sample(*render(c, template, tokenizer, "assistant"), MAX_LEN) for c in load_conversations(path)]
        samples = [s for s in samples if s is not None]
    else:
        samples = load_sft_dataset(path, tokenizer, template, MAX_LEN, "assistant", tokenizer.vocab_size).samples
    seconds = time.perf_counter() - started
    loaded_peak = host_memory()[1]
    # read every sample once, as an epoch does (a checksum of the content that both ways must agree on)
    checksum = sum(int(s.input_ids.sum()) + int(s.labels.sum()) for s in samples) if samples else 0
    print(json.dumps({"samples": len(samples) if samples else 0, "checksum": checksum, "seconds": round(seconds, 2),
                      "loaded_peak_rss_mib": round(loaded_peak / 2**20, 1),
                      "epoch_peak_rss_mib": round(host_memory()[1] / 2**20, 1),
                      "epoch_anonymous_rss_mib": round(status_kib("RssAnon") / 1024, 1),
                      "epoch_file_rss_mib": round(status_kib("RssFile") / 1024, 1)}))


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(mode: str, path: Path | str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], check=True, capture_output=True,
                            text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--out", default="benchmarks/results/data_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    base = {"jsonl": run_child("baseline", ""), "parquet": run_child("baseline_pyarrow", "")}
    baselines = {kind: result["loaded_peak_rss_mib"] for kind, result in base.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_data(Path(tmp), args.conversations)
        for kind, path in files.items():
            measured = {mode: run_child(mode, path) for mode in ("eager", "store")}
            eager, store = ((measured[m]["samples"], measured[m]["checksum"]) for m in ("eager", "store"))
            if eager != store:
                raise SystemExit(f"{kind}: the store and the eager path disagree: {measured}")
            for mode, result in measured.items():
                rows.append({"format": kind, "mode": mode, "file_mib": round(path.stat().st_size / 2**20, 1),
                             "samples": result["samples"], "seconds": result["seconds"],
                             "loaded_peak_rss_mib": result["loaded_peak_rss_mib"],
                             "loaded_peak_over_baseline_mib": round(result["loaded_peak_rss_mib"] - baselines[kind], 1),
                             "epoch_peak_rss_mib": result["epoch_peak_rss_mib"],
                             "epoch_anonymous_rss_mib": result["epoch_anonymous_rss_mib"],
                             "epoch_file_rss_mib": result["epoch_file_rss_mib"]})
    result = {"benchmark": "data_memory", "conversations": args.conversations, "max_seq_len": MAX_LEN,
              "baseline_rss_mib": baselines,
              "baseline_anonymous_rss_mib": {kind: result["epoch_anonymous_rss_mib"] for kind, result in base.items()},
              "baseline_file_rss_mib": {kind: result["epoch_file_rss_mib"] for kind, result in base.items()},
              "rows": rows, "command": " ".join(sys.argv)}
    write_results(args.out, result)
    print(f"baseline (polytrain imported, tokenizer loaded): {baselines['jsonl']:.0f} MiB, with pyarrow "
          f"{baselines['parquet']:.0f} MiB; {args.conversations} conversations")
    print(f"{'format':>8}{'mode':>7}{'file':>9}{'samples':>9}{'load s':>8}{'loaded peak':>13}{'over base':>11}"
          f"{'epoch peak':>12}{'anon':>8}{'file-backed':>13}")
    for row in rows:
        print(f"{row['format']:>8}{row['mode']:>7}{row['file_mib']:>7.1f}Mi{row['samples']:>9}{row['seconds']:>8.1f}"
              f"{row['loaded_peak_rss_mib']:>11.0f}Mi{row['loaded_peak_over_baseline_mib']:>9.0f}Mi"
              f"{row['epoch_peak_rss_mib']:>10.0f}Mi{row['epoch_anonymous_rss_mib']:>6.0f}Mi"
              f"{row['epoch_file_rss_mib']:>11.0f}Mi")


if __name__ == "__main__":
    main()
