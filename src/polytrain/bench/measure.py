"""Timing statistics and the measured matmul peak that MFU is taken against on a backend without a spec sheet."""

from __future__ import annotations

import statistics
import time

import torch

from polytrain.backends import Backend


def matmul_peak(backend: Backend, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square `size` matmul in `dtype` on the backend's device (after three warm-up runs).

    The CPU has no published peak that holds for a given container, so MFU there is taken against this measured
    figure: what the machine's BLAS reaches on a large, well-shaped GEMM.
    """
    device = backend.device()
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    backend.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def summarize(times: list[float]) -> dict[str, float]:
    """Median, mean, min, max, 10th / 90th percentile (nearest rank) and the relative spread of step times."""
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    median = statistics.median(ordered)
    return {"median": median, "mean": statistics.fmean(ordered), "min": ordered[0], "max": ordered[-1],
            "p10": pct(0.1), "p90": pct(0.9), "spread_pct": 100 * (pct(0.9) - pct(0.1)) / median, "n": len(ordered)}
