"""Stopping cleanly: SIGINT / SIGTERM ask the loop to stop at the next step boundary."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM during training; the last completed step was checkpointed."""


class StopRequest:
    """SIGINT / SIGTERM handler that asks the loop to stop at the next step boundary (where the model, optimizer
    and data position agree, so the checkpoint is exact). A second SIGINT interrupts at once, without saving, except
    while a checkpoint is being written (`shield`): that finishes first, then the loop stops as asked."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._shielded = 0

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            if self._shielded:
                print("a checkpoint is being written: it finishes first, then training stops", file=sys.stderr,
                      flush=True)
                return
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """A block no signal cuts short (writing a checkpoint): signals only ask the loop to stop."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
