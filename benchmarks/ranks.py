"""Run a benchmark's worker as N gloo processes, as torchrun would (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, one thread each), and read back what each rank wrote: `<folder>/rank<r>.json`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, command: Callable[[str], list[str]], timeout: float, what: str) -> list[Any]:
    """`command(folder)` as `world` processes; each rank writes `folder/rank<r>.json`. RuntimeError naming `what`
    if a rank fails or outlives `timeout` seconds (every rank is killed then)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        procs = []
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if world > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
            procs.append(subprocess.Popen(command(tmp), env=env))
        try:
            for proc in procs:
                if proc.wait(timeout=timeout):
                    raise RuntimeError(f"{what}: a rank failed")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
