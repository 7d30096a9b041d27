"""`polytrain bench --compare A.json B.json ...`: results side by side, with each one's ratio to the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polytrain.errors import DataError

ROWS: list[tuple[str, str, float, str]] = [
    # (label, dotted key, scale, format)
    ("tokens/s", "tokens_per_s", 1.0, "{:,.0f}"),
    ("tokens/s per device", "tokens_per_s_per_device", 1.0, "{:,.0f}"),
    ("step time median (s)", "step_time_s.median", 1.0, "{:.4f}"),
    ("step time p10-p90 spread (%)", "step_time_s.spread_pct", 1.0, "{:.1f}"),
    ("model TFLOP/s", "achieved_flops_per_s", 1e-12, "{:.3f}"),
    ("peak TFLOP/s", "peak_flops_per_s", 1e-12, "{:.3f}"),
    ("MFU (%)", "mfu", 100.0, "{:.1f}"),
    ("peak device memory (GiB)", "peak_device_memory_bytes", 2**-30, "{:.3f}"),
    ("peak host memory (GiB)", "peak_host_memory_bytes", 2**-30, "{:.3f}"),
]
REQUIRED = ("tokens_per_s", "step_time_s", "mfu")


def load_result(path: str | Path) -> dict[str, Any]:
    """A `polytrain bench --json` file; DataError naming the file when it is missing or is not one."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON (line {err.lineno}: {err.msg})") from None
    missing = [key for key in REQUIRED if not isinstance(result, dict) or key not in result]
    if missing:
        raise DataError(f"{path}: not a `polytrain bench --json` result (missing {', '.join(missing)})")
    return result


def _value(result: dict[str, Any], key: str) -> float | None:
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def compare_table(paths: list[str]) -> str:
    """A plain-text table: one column per result, then `xN` ratios of each later result to the first."""
    return results_table([load_result(p) for p in paths], [Path(p).stem for p in paths])


def results_table(results: list[dict[str, Any]], names: list[str]) -> str:
    """`results` side by side under `names` (one result: the figures of one `polytrain bench` run)."""
    header = ["", *names, *[f"{n} / {names[0]}" for n in names[1:]]]
    rows = [header, ["device", *[r.get("device", "?") for r in results], *[""] * (len(results) - 1)],
            ["layout", *[r.get("layout", "?") for r in results], *[""] * (len(results) - 1)]]
    for label, key, scale, fmt in ROWS:
        values = [_value(r, key) for r in results]
        cells = [fmt.format(v * scale) if v is not None else "-" for v in values]
        base = values[0]
        ratios = [f"x{v / base:.2f}" if v is not None and base else "-" for v in values[1:]]
        rows.append([label, *cells, *ratios])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
