"""Device helpers shared by the training scripts of this directory: one branch or table entry per device type.

The code already handles Ascend (torch_npu registers `torch.npu` and the "npu" device), so only the CUDA-only
lines outside the per-device branches need porting.
"""

import torch

BACKENDS = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "cpu": "gloo"}


def backend_for(device: torch.device) -> str:
    """The process-group backend of a device type."""
    return BACKENDS[device.type]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def memory_allocated(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "npu":
        return torch.npu.memory_allocated(device)
    return 0


def describe(device: torch.device) -> str:
    """A label for logs: "GPU", "NPU", "CPU"."""
    return "GPU" if device.type == "cuda" else device.type.upper()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # [cuda-only]
