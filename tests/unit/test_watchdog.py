"""The hang watchdog writes its report only when something hangs, and then ends the process."""

from __future__ import annotations

import subprocess
import sys
import time

from polytrain.train.watchdog import Watchdog

HANG = """
import sys, time
from pathlib import Path
from polytrain.train.watchdog import Watchdog

watchdog = Watchdog(Path(sys.argv[1]), enabled=True)
watchdog.arm(0.5, "step 3")
time.sleep(60)
"""


def test_no_report_while_nothing_hangs(tmp_path):
    report = tmp_path / "hang_rank0.txt"
    watchdog = Watchdog(report, enabled=True)
    for step in range(3):
        watchdog.arm(5, f"step {step}")
        time.sleep(0.05)
        assert not report.exists()
        watchdog.disarm()
    watchdog.close()
    assert not report.exists()


def test_a_hang_writes_the_stacks_and_exits(tmp_path):
    report = tmp_path / "hang_rank0.txt"
    started = time.time()
    result = subprocess.run([sys.executable, "-c", HANG, str(report)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and time.time() - started < 30
    text = report.read_text()
    assert text.startswith("polytrain watchdog: step 3 did not finish within 0.5 s; stacks:")
    assert "time.sleep" in text or "<module>" in text
    assert f"stacks in {report}" in result.stderr
