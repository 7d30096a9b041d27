"""polytrain's own reductions work on every backend's process group: values reach a collective on the backend's
device, in an element type its library reduces (no float64), and the checker the distributed tests run under
catches a collective that breaks either rule."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from polytrain.backends.cpu import GLOO_DTYPES
from polytrain.backends.cuda import NCCL_DTYPES
from polytrain.backends.npu import HCCL_DTYPES
from polytrain.parallel.collectives import (
    CHECK_ENV,
    CHECKED,
    CollectivePlacementError,
    check_tensors,
    install_check,
    sum_,
)
from tests.distributed.harness import free_port


def test_the_checker_refuses_host_tensors_on_a_device_group_and_float64_on_hccl():
    with pytest.raises(CollectivePlacementError, match="a cpu tensor on a process group for cuda tensors"):
        check_tensors("all_reduce", [torch.zeros(2)], "cuda", NCCL_DTYPES)
    with pytest.raises(CollectivePlacementError, match="torch.float64 is not an element type"):
        check_tensors("all_reduce", [torch.zeros(2, dtype=torch.float64)], "cpu", HCCL_DTYPES)
    check_tensors("all_gather", [[torch.zeros(2), torch.ones(2)], torch.zeros(4)], "cpu", HCCL_DTYPES)
    assert torch.float64 in GLOO_DTYPES and torch.float64 in NCCL_DTYPES and torch.float64 not in HCCL_DTYPES


@pytest.fixture
def checked_group(monkeypatch):
    """A 1-rank gloo process group whose collectives check their tensors against HCCL's table."""
    monkeypatch.setenv(CHECK_ENV, "hccl")
    originals = {name: getattr(dist, name) for name in CHECKED}
    install_check("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for name, fn in originals.items():
        setattr(dist, name, fn)


def test_float64_sums_travel_as_float32_halves_and_stay_exact(checked_group):
    # a token count beyond float32's 2^24 and a fractional loss sum
    values = torch.tensor([2.0**40 + 3, 1.25e-3, 7.0], dtype=torch.float64)
    sum_(values, None, torch.device("cpu"))
    assert values[0].item() == 2.0**40 + 3 and values[2].item() == 7.0  # integers below 2^48: exact
    assert values[1].item() == pytest.approx(1.25e-3, rel=2.0**-47)  # 48 significant bits
    counts = torch.tensor([5, 6], dtype=torch.int64)
    sum_(counts, None, torch.device("cpu"))
    assert counts.tolist() == [5, 6]


def test_a_float64_collective_fails_under_the_checker(checked_group):
    """What the reductions did before they went through sum_: a float64 all-reduce, which HCCL refuses."""
    with pytest.raises(CollectivePlacementError, match="float64"):
        dist.all_reduce(torch.zeros(3, dtype=torch.float64))


def test_accelerator_process_groups_take_host_tensors_through_gloo():
    """An accelerator-only process group fails on the first host tensor (`No backend type associated with device
    type cpu`): the trainer's group gives host tensors to gloo and device tensors to NCCL / HCCL."""
    from polytrain.backends.base import Backend
    from polytrain.backends.cpu import CPUBackend
    from polytrain.backends.cuda import CUDABackend
    from polytrain.backends.npu import NPUBackend

    groups = {cls: Backend.process_group_backend.fget(cls) for cls in (CPUBackend, CUDABackend, NPUBackend)}
    assert groups == {CPUBackend: "gloo", CUDABackend: "cpu:gloo,cuda:nccl", NPUBackend: "cpu:gloo,npu:hccl"}


EXIT_SCRIPT = """
import atexit, os, sys
from datetime import timedelta
import torch, torch.distributed as dist
from polytrain.parallel.runtime import exit_process, init_process_group
if sys.argv[1] == "joined":
    init_process_group("gloo", timedelta(seconds=30))
    dist.all_reduce(torch.ones(3))
atexit.register(lambda: print("atexit ran, group alive:", dist.is_initialized(), flush=True))
print("unflushed line", end="")
exit_process(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_exit_process_runs_the_atexit_handlers_flushes_and_keeps_the_exit_status(joined):
    """A process that joined a process group leaves through os._exit after its atexit handlers (polytrain's own
    destroys the group first: registered first, it runs last) and a flush; one that did not exits normally."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, "joined" if joined else "alone"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "unflushed lineatexit ran, group alive: " + str(joined) + "\n", done.stdout
