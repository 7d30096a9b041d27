"""Training guard: a non-finite loss or gradient norm, or a loss spike, triggers the configured action.

A spike is a loss more than `spike_zscore` standard deviations above the mean of the last `spike_window` accepted
steps. Every event is appended to run_dir/guard_events.jsonl and reported on the console; `max_consecutive` events
in a row stop the run with a report. Decisions use values that are identical on every rank (the globally reduced
loss and gradient norm), so all ranks decide the same without extra communication.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytrain.errors import PolytrainError

EVENTS_FILE = "guard_events.jsonl"


class GuardStop(PolytrainError):
    """Too many consecutive guard events (or action = stop)."""


@dataclass
class GuardEvent:
    step: int
    kind: str  # nonfinite_loss | nonfinite_grad | loss_spike
    loss: float
    grad_norm: float
    action: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in self.__dict__.items()}
        return clean


class Guard:
    def __init__(self, cfg: Any, events_path: Path | None, watch_spikes: bool = True) -> None:  # cfg: GuardConfig
        self.cfg = cfg
        self.watch_spikes = watch_spikes
        self.events_path = events_path
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = 0
        self.total = 0

    def check(self, step: int, loss: float, grad_norm: float) -> GuardEvent | None:
        """The event for this step, or None if the step may proceed (its loss then joins the history)."""
        if self.cfg.action == "off":
            return None
        kind, detail = None, ""
        if not math.isfinite(loss):
            kind = "nonfinite_loss"
        elif not math.isfinite(grad_norm):
            kind = "nonfinite_grad"
        elif self.watch_spikes and self.cfg.spike_zscore > 0 and len(self.history) >= self.cfg.spike_min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            z = (loss - mean) / (std + 1e-8)
            if z > self.cfg.spike_zscore:
                kind, detail = "loss_spike", f"z-score {z:.1f} over the last {len(self.history)} steps"
        if kind is None:
            self.history.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.total += 1
        return GuardEvent(step, kind, loss, grad_norm, self.cfg.action, detail)

    def record(self, event: GuardEvent, write: bool) -> None:
        if write and self.events_path is not None:
            with self.events_path.open("a") as handle:
                handle.write(json.dumps(event.as_dict()) + "\n")
        if self.cfg.action == "stop" or self.consecutive > self.cfg.max_consecutive:
            raise GuardStop(
                f"guard: {event.kind} at step {event.step} (loss {event.loss}, grad norm {event.grad_norm}); "
                f"{self.consecutive} event(s) in a row, limit {self.cfg.max_consecutive}: stopping. The last good "
                f"checkpoint is intact; events are listed in {self.events_path}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.extend(state.get("history", []))
        self.consecutive = state.get("consecutive", 0)
        self.total = state.get("total", 0)
