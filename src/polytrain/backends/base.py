"""The interface every device backend implements.

polytrain code above this package asks a `Backend` for everything device-specific: the torch device, the
torch.distributed backend name, synchronisation, memory figures, RNG state and the preferred autocast dtype.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from polytrain.errors import BackendError


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; code checks these at start-up and fails loudly instead of falling back silently."""

    bf16: bool = True
    fp16: bool = True
    fp8: bool = False
    grouped_mm: bool = False
    """`torch._grouped_mm` runs on this device for the dtypes training uses."""
    device_memory_stats: bool = False
    """Allocator statistics (allocated / peak) are available for the device."""
    fused_attention: bool = False
    """A fused attention kernel backs `scaled_dot_product_attention` (flash / NPU fused attention)."""


@dataclass(frozen=True)
class MemoryStats:
    """Memory figures in bytes. Device figures are 0 on a backend with no device allocator (the CPU)."""

    device_allocated: int
    device_peak_allocated: int
    device_reserved: int
    host_rss: int
    host_peak_rss: int

    def as_gib(self) -> dict[str, float]:
        return {name: round(value / 2**30, 4) for name, value in self.__dict__.items()}


def host_memory() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes."""
    current = peak = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        current = peak
    return current, peak


class Backend:
    """One device type. Subclasses fill in the class attributes and override what differs."""

    name: str = ""
    """What the user types for `--device`."""
    device_type: str = ""
    """The torch device type string."""
    dist_backend: str = ""
    """torch.distributed backend for collectives on this device."""
    collective_dtypes: frozenset[torch.dtype] = frozenset()
    """Element types `dist_backend` reduces and moves on this device (its documented table)."""

    @property
    def process_group_backend(self) -> str:
        """The `init_process_group` backend: the device's own, plus gloo for host tensors (checkpoint metadata,
        object collectives) on an accelerator, so a host tensor never reaches the device backend."""
        if self.device_type == "cpu":
            return self.dist_backend
        return f"cpu:gloo,{self.device_type}:{self.dist_backend}"

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def handles(cls, device_type: str) -> bool:
        """Whether tensors on `device_type` are this backend's (`kernel` looks their kernels up here)."""
        return device_type == cls.device_type

    @classmethod
    def create(cls) -> Backend:
        """The backend, or a one-line BackendError saying why it cannot run here (`--device NAME`)."""
        if not cls.is_available():
            raise BackendError(f"--device {cls.name}: no {cls.device_type} device is visible here")
        return cls()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Preferred autocast dtype, or None when autocast would not help on this device."""
        return torch.bfloat16

    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.device_type, index) if index is not None else torch.device(self.device_type)

    def set_device(self, local_rank: int) -> None:
        """Bind this process to its local device (called once per rank before any collective)."""

    def device_count(self) -> int:
        return 1

    def prepare_training(self) -> None:
        """Process-wide settings a training process wants on this device (called once, before the model is built)."""

    def synchronize(self) -> None:
        """Wait for all queued work on the current device (so timings and memory figures are real)."""

    def memory_stats(self) -> MemoryStats:
        current, peak = host_memory()
        return MemoryStats(0, 0, 0, current, peak)

    def reset_peak_memory_stats(self) -> None:
        """Restart the device peak counter (the host peak RSS cannot be reset)."""

    def free_memory(self) -> int:
        """Bytes that can still be allocated where tensors live (the CPU: the host's available memory)."""
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
        """Autocast to `dtype` on this device, or a no-op context for full precision."""
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def describe(self) -> str:
        return f"{self.name} ({self.device_type}, {self.dist_backend})"

    def chip_name(self) -> str | None:
        """The device's product name as its runtime reports it (e.g. "NVIDIA H100 80GB HBM3", "Ascend910B2"), or
        None where there is none to report (the CPU)."""
        return None

    def kernels(self) -> dict[str, Callable[..., torch.Tensor]]:
        """This device's implementations of polytrain's replaceable ops (see `polytrain.backends.kernel`):
        "grouped_mm"(x [M, K], weight [E, K, N], offsets int32 [E] cumulative rows) -> [M, N], differentiable."""
        return {"grouped_mm": torch._grouped_mm} if self.capabilities.grouped_mm else {}


class AcceleratorBackend(Backend):
    """A device reached through `torch.accelerator` and `torch.get_device_module` (CUDA, NPU, PrivateUse1)."""

    def _module(self):
        return torch.get_device_module(self.device_type)

    def device_count(self) -> int:
        return self._module().device_count()

    def set_device(self, local_rank: int) -> None:
        self._module().set_device(local_rank)

    def device(self, index: int | None = None) -> torch.device:
        if index is None:
            index = self._module().current_device()
        return torch.device(self.device_type, index)

    def synchronize(self) -> None:
        self._module().synchronize()

    def memory_stats(self) -> MemoryStats:
        module = self._module()
        current, peak = host_memory()
        return MemoryStats(
            device_allocated=module.memory_allocated(),
            device_peak_allocated=module.max_memory_allocated(),
            device_reserved=module.memory_reserved(),
            host_rss=current,
            host_peak_rss=peak,
        )

    def reset_peak_memory_stats(self) -> None:
        self._module().reset_peak_memory_stats()

    def free_memory(self) -> int:
        return int(self._module().mem_get_info()[0])  # torch.cuda / torch.npu: (free, total) of the current device

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every device's generator too
        self._module().manual_seed_all(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), self.device_type: self._module().get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device_type in state:
            self._module().set_rng_state(state[self.device_type])

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(device_memory_stats=True, grouped_mm=hasattr(torch, "_grouped_mm"))

    def describe(self) -> str:
        return f"{self.name} ({self.device_count()} x {self.device_type}, {self.dist_backend})"

    def chip_name(self) -> str | None:
        return str(self._module().get_device_name())
