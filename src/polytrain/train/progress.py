"""Progress lines for the console.

A cluster job's log is never a terminal, so the progress bar is off there; instead one full-width line is printed
every `log.print_every` steps (default: every 5% of the run) and at least every `log.print_every_s` seconds: the
objective's headline metrics, learning rate, gradient norm, smoothed throughput, MFU where the device's peak is
known, memory, elapsed time and ETA.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from polytrain.backends.base import MemoryStats
from polytrain.objectives.base import Metric


def format_duration(seconds: float) -> str:
    """12s, 4m10s, 2h05m, 3d04h."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


class Throughput:
    """Seconds per step and tokens/s over the last `window` steps: smoothed, and once the window has moved past the
    first step (compilation, allocation) free of it."""

    def __init__(self, window: int = 20) -> None:
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)

    def add(self, seconds: float, tokens: int) -> None:
        self._steps.append((seconds, tokens))

    @property
    def step_seconds(self) -> float:
        return sum(s for s, _ in self._steps) / len(self._steps) if self._steps else math.nan

    @property
    def tokens_per_s(self) -> float:
        seconds = sum(s for s, _ in self._steps)
        return sum(t for _, t in self._steps) / seconds if seconds > 0 else math.nan


@dataclass
class Progress:
    """What a progress line needs to know about the run. `peak_flops`: dense peak of the whole job (all devices);
    None: no MFU."""

    total_steps: int
    start_step: int
    headline: tuple[Metric, ...]
    flops_per_token: float
    peak_flops: float | None
    every_steps: int = 0
    every_s: float = 60.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.every_steps <= 0:
            self.every_steps = max(1, math.ceil(self.total_steps / 20))
        self.throughput = Throughput()
        self.started = self.clock()
        self.last_line = self.started

    def step_done(self, seconds: float, tokens: int) -> None:
        self.throughput.add(seconds, tokens)

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops or not self.flops_per_token:
            return None
        return self.throughput.tokens_per_s * self.flops_per_token / self.peak_flops

    def due(self, step: int, force: bool = False) -> bool:
        """Whether step `step` gets a line: the first step this process runs, every `every_steps`, the last, when
        `every_s` seconds passed since the last line, or when `force`d (a guard event)."""
        return (force or step == self.start_step + 1 or step % self.every_steps == 0 or step == self.total_steps
                or (self.every_s > 0 and self.clock() - self.last_line >= self.every_s))

    def headline_text(self, stats: dict[str, Any]) -> str:
        parts = [m.format(stats[m.key]) for m in self.headline if isinstance(stats.get(m.key), (int, float))]
        if "loss" not in (m.key for m in self.headline):
            parts.append(f"loss {stats['loss']:.4f}")
        return ", ".join(parts)

    def line(self, step: int, stats: dict[str, Any], memory: MemoryStats, device_memory: bool) -> str:
        """One full progress line for step `step` (its `stats` from the trainer)."""
        now = self.clock()
        self.last_line = now
        elapsed = now - self.started
        remaining = (self.total_steps - step) * self.throughput.step_seconds
        parts = [f"step {step}/{self.total_steps} ({step / self.total_steps:.0%})", self.headline_text(stats),
                 f"lr {stats['lr']:.2e}", f"grad norm {stats['grad_norm']:.3f}"]
        if "guard" in stats:
            parts.append(f"guard: {stats['guard']}")
        parts.append(f"{self.throughput.tokens_per_s:,.0f} tok/s")
        if self.mfu is not None:
            parts.append(f"MFU {self.mfu:.1%}")
        host = f"{memory.host_peak_rss / 2**30:.1f} GiB host"
        parts.append(f"mem {memory.device_peak_allocated / 2**30:.1f} GiB device, {host}" if device_memory
                     else f"mem {host}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if step < self.total_steps and math.isfinite(remaining):
            parts.append(f"ETA {format_duration(remaining)}")
        return " | ".join(parts)
