"""The single-process run every parallel layout of the default job is compared with: run once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.distributed.harness import run, write_job

# Every rank of every distributed test checks each collective's tensors against HCCL's element types (the strictest
# table: no float64) and the runtime's device (polytrain.parallel.collectives).
os.environ["POLYTRAIN_CHECK_COLLECTIVES"] = "hccl"


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(the default job's config, its single-process run directory)."""
    root = tmp_path_factory.mktemp("ref")
    job = write_job(root)
    run(job, root / "single", 1)
    return job, root / "single"
