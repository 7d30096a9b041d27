"""Hang watchdog: if a step (or a collective inside it) does not finish in time, dump every thread's Python stack
and end the process with a non-zero exit, instead of hanging until the cluster scheduler's limit.

Built on faulthandler, whose watchdog is a C thread: it fires even while the main thread is blocked in C code.
Under torchrun the exit is a worker failure, so `--max-restarts` restarts the job from the last checkpoint.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path
from typing import IO


class Watchdog:
    def __init__(self, dump_path: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self._file: IO[str] | None = None
        if enabled and dump_path is not None:
            dump_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = dump_path.open("w")

    def arm(self, timeout_s: float, what: str) -> None:
        """Dump and exit unless `disarm` (or another `arm`) comes within `timeout_s` seconds."""
        if not self.enabled or timeout_s <= 0:
            return
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"polytrain watchdog: {what} did not finish within {timeout_s:g} s; stacks:\n")
            self._file.flush()
        faulthandler.dump_traceback_later(timeout_s, repeat=False, file=self._file or None, exit=True)

    def disarm(self) -> None:
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Normal end: the dump file only ever holds a stack report if the process died, so remove it."""
        self.disarm()
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
