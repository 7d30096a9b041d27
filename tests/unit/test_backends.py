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
