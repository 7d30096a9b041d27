"""Fault injection for resilience tests: POLYTRAIN_FAULTS="kind@step[:key=value...],..." in the environment.

kinds: nan_loss (the step's loss becomes NaN), spike (the step's loss x 1000), kill (SIGKILL during the step),
kill_in_save (SIGKILL after the shards of the step's checkpoint are written, before it is committed), hang
(sleep `seconds` inside the step), disk_full (the step's checkpoint write fails with ENOSPC), slow_save (sleep
`seconds` while the step's checkpoint is written).
keys: rank=R (default every rank), seconds=S (hang). A fault fires once, and only in a job's first attempt
(TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job runs clean. Never set this in production.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field

ENV = "POLYTRAIN_FAULTS"


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None = None
    seconds: float = 3600.0
    fired: bool = field(default=False, compare=False)


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, *options = item.split(":")
        kind, step = head.split("@")
        fault = Fault(kind, int(step))
        for option in options:
            key, value = option.split("=")
            if key == "rank":
                fault.rank = int(value)
            elif key == "seconds":
                fault.seconds = float(value)
        faults.append(fault)
    return faults


class Faults:
    def __init__(self, rank: int) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        self.faults = parse(os.environ.get(ENV, "")) if first_attempt else []
        self.rank = rank

    def _take(self, kind: str, step: int) -> Fault | None:
        for fault in self.faults:
            if fault.kind == kind and fault.step == step and not fault.fired and fault.rank in (None, self.rank):
                fault.fired = True
                return fault
        return None

    def loss_factor(self, step: int) -> float:
        """Multiplier for the step's loss: NaN or a spike when injected, else 1."""
        if self._take("nan_loss", step):
            return float("nan")
        if self._take("spike", step):
            return 1000.0
        return 1.0

    def during_step(self, step: int) -> None:
        if self._take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        fault = self._take("hang", step)
        if fault:
            time.sleep(fault.seconds)

    def during_save(self, step: int) -> None:
        if self._take("disk_full", step):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        fault = self._take("slow_save", step)
        if fault:
            time.sleep(fault.seconds)

    def before_commit(self, step: int) -> None:
        if self._take("kill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
