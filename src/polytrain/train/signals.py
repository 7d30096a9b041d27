"""Stopping cleanly: SIGINT / SIGTERM ask the loop to stop at the next step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM during training; the last completed step was checkpointed."""


class StopRequest:
    """SIGINT / SIGTERM handler that asks the loop to stop at the next step boundary (where the model, optimizer
    and data position agree, so the checkpoint is exact). A second SIGINT interrupts at once, without saving."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
