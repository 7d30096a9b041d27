"""Backend layer: CPU backend facts, one-line errors for unavailable devices, RNG and autocast helpers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from polytrain.backends import DEVICE_CHOICES, get_backend
from polytrain.backends.cpu import CPUBackend
from polytrain.errors import BackendError
from tests.conftest import ROOT


def test_cpu_backend_facts():
    backend = get_backend("cpu")
    assert isinstance(backend, CPUBackend)
    assert backend.device() == torch.device("cpu")
    assert backend.dist_backend == "gloo"
    stats = backend.memory_stats()
    assert stats.host_peak_rss >= stats.host_rss > 0
    backend.synchronize()


def test_auto_picks_cpu_on_a_machine_without_accelerators():
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator; auto would pick it")
    assert get_backend("auto").name == "cpu"


def test_npu_without_torch_npu_is_a_one_line_error():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(BackendError) as err:
        get_backend("npu")
    assert "torch_npu" in str(err.value) and "\n" not in str(err.value)


def test_unknown_device_suggests_a_valid_one():
    with pytest.raises(BackendError, match="did you mean `cpu`"):
        get_backend("cpuu")
    assert set(DEVICE_CHOICES) >= {"auto", "cpu", "cuda", "npu"}


def test_rng_state_round_trip_reproduces_draws():
    backend = get_backend("cpu")
    backend.manual_seed(11)
    state = backend.get_rng_state()
    first = torch.rand(4)
    backend.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


def test_autocast_none_is_full_precision_and_bf16_casts_matmuls():
    backend = get_backend("cpu")
    a = torch.randn(4, 4)
    with backend.autocast(None):
        assert (a @ a).dtype == torch.float32
    with backend.autocast(torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_cli_device_npu_error_is_printed_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "polytrain", "generate", str(tmp_path), "--prompt", "x", "--device", "npu"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


KEEP_MEMORY_PROBE = """
import sys, torch
from polytrain.backends.base import host_memory
from polytrain.backends.cpu import keep_freed_host_memory
print(keep_freed_host_memory() if sys.argv[1] == "keep" else False)
block = torch.ones(64 * 2**20)  # 256 MiB, touched
before = host_memory()[0]
del block
print((before - host_memory()[0]) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_cpu_training_keeps_freed_host_memory_for_the_next_step(mode, tmp_path):
    """glibc hands a freed 256 MiB block back to the kernel (RSS drops); after keep_freed_host_memory it stays in
    the process, so the next step's allocation is not page-faulted in again."""
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", KEEP_MEMORY_PROBE, mode], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    took, released_mib = out[0] == "True", int(out[1])
    if mode == "keep":
        assert took and released_mib < 16
    else:
        assert not took and released_mib > 200


def test_keeping_host_memory_can_be_turned_off(monkeypatch):
    from polytrain.backends.cpu import keep_freed_host_memory

    monkeypatch.setenv("POLYTRAIN_RELEASE_HOST_MEMORY", "1")
    assert keep_freed_host_memory() is False


def test_one_registry_names_every_backend_and_reaches_its_kernels(monkeypatch):
    """BACKENDS is the only list: --device choices, auto's order, collective tables and kernel lookup all come from
    it, and every backend's kernels are reachable by its device type (PrivateUse1's by its registered name)."""
    from polytrain.backends import BACKENDS, backend_classes, kernel
    from polytrain.backends.privateuse1 import PrivateUse1Backend

    classes = backend_classes()
    assert [cls.name for cls in classes] == list(BACKENDS) and set(DEVICE_CHOICES) == {"auto", *BACKENDS}
    kernel.cache_clear()
    for cls in classes:
        sentinel = object()
        monkeypatch.setattr(cls, "is_available", classmethod(lambda c: True))
        monkeypatch.setattr(cls, "create", classmethod(lambda c, s=sentinel: type("B", (), {
            "kernels": lambda self: {"grouped_mm": s}})()))
        device_type = cls.device_type
        if cls is PrivateUse1Backend:
            device_type = "my_accelerator"
            monkeypatch.setattr("polytrain.backends.privateuse1.privateuse1_name", lambda: "my_accelerator")
        assert kernel("grouped_mm", device_type) is sentinel, cls.__name__
        monkeypatch.undo()
        kernel.cache_clear()
