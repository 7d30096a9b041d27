"""Hang watchdog: if a step (or a collective inside it) does not finish in time, write every thread's Python stack
to the run directory's hang_rank<r>.txt and end the process with a non-zero exit, instead of hanging until the
cluster scheduler's limit.

A Python thread watches the deadline, so the report file exists only once something hung. Hangs wait in C code
that releases the GIL (collectives, I/O, sleeps), where that thread runs; as a backstop for C code that holds the
GIL, faulthandler's own C-thread watchdog dumps the stacks to stderr and exits `BACKSTOP_S` seconds later. Under
torchrun the exit is a worker failure, so `--max-restarts` restarts the job from the last checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

BACKSTOP_S = 30.0


def _stream_with_fd() -> Any:
    """The process's stderr as faulthandler needs it (a real file descriptor), even when sys.stderr was replaced
    (e.g. captured by a test runner); None if there is none."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return None


class Watchdog:
    def __init__(self, dump_path: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self.dump_path = dump_path
        self._lock = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._timeout = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._watch, name="polytrain-watchdog", daemon=True)
            self._thread.start()

    def arm(self, timeout_s: float, what: str) -> None:
        """Report and exit unless `disarm` (or another `arm`) comes within `timeout_s` seconds."""
        if not self.enabled or timeout_s <= 0:
            return
        with self._lock:
            self._deadline, self._what, self._timeout = time.monotonic() + timeout_s, what, timeout_s
            self._lock.notify()
        backstop = _stream_with_fd()
        if backstop is not None:
            faulthandler.dump_traceback_later(timeout_s + BACKSTOP_S, repeat=False, file=backstop, exit=True)

    def disarm(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._deadline = None
            self._lock.notify()
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Normal end: stop watching."""
        self.disarm()
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                self._report(self._what, self._timeout)

    def _report(self, what: str, timeout_s: float) -> None:
        message = f"polytrain watchdog: {what} did not finish within {timeout_s:g} s; stacks:\n"
        try:
            if self.dump_path is None:
                raise OSError("no report file")
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            with self.dump_path.open("w") as report:
                report.write(message)
                report.flush()
                faulthandler.dump_traceback(report, all_threads=True)
            sys.stderr.write(f"{message.split(';')[0]}; stacks in {self.dump_path}\n")
        except OSError:
            sys.stderr.write(message)
            stream = _stream_with_fd()
            if stream is not None:
                faulthandler.dump_traceback(stream, all_threads=True)
        sys.stderr.flush()
        os._exit(1)
