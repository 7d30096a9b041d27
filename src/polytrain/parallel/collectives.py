"""The few reductions polytrain itself makes (loss and token sums, agreement flags, gradient norms), done so that
they work on every backend's process group, and a checker that proves it in the CPU test suite.

On an accelerator, the default process group runs the device's library (NCCL, HCCL) for device tensors and gloo for
host tensors (`Backend.process_group_backend`); polytrain's own reductions still move their values to the device,
in an element type the device's library reduces (`Backend.collective_dtypes`): no float64 ever reaches a
collective. float64 sums travel as two float32 halves each (x = hi + lo, 48 significant bits), gathered from every
rank and added up in float64 on arrival: exact for token counts far beyond 2^24 and as precise as float64
accumulation for loss sums, at the cost of an all-gather of 8 bytes per value and rank (the sums are a few values).

`POLYTRAIN_CHECK_COLLECTIVES=<library>` (gloo, nccl or hccl; the distributed tests set hccl, the strictest) makes
every collective of the process check its tensors: on the runtime's device, of an element type the library reduces.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

CHECK_ENV = "POLYTRAIN_CHECK_COLLECTIVES"
CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
           "reduce_scatter_single", "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "send", "recv",
           "batch_isend_irecv")
# isend / irecv are not wrapped: torch.distributed.P2POp checks its op by identity against them. Pipeline
# transfers go through batch_isend_irecv, whose P2POps are checked.


class CollectivePlacementError(AssertionError):
    """A collective got a tensor its process group's backend cannot take on this device."""


def sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    """Sum `tensor` over `group`, in place, whatever its device and element type (see the module docstring)."""
    if tensor.dtype != torch.float64:
        moved = tensor.to(device)
        dist.all_reduce(moved, group=group)
        tensor.copy_(moved.to(tensor.device))
        return tensor
    flat = tensor.reshape(-1)
    hi = flat.float()
    lo = (flat - hi.double()).float()
    pair = torch.stack([hi, lo]).to(device)  # [2, n]
    gathered = [torch.empty_like(pair) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, pair, group=group)
    total = torch.stack(gathered).to(tensor.device).double().sum(dim=(0, 1))
    tensor.copy_(total.view_as(tensor))
    return tensor


def check_tensors(op: str, tensors: Iterable[object], device_type: str, dtypes: frozenset[torch.dtype]) -> None:
    """Raise CollectivePlacementError if a tensor among `tensors` is not on `device_type` or not of `dtypes`."""
    for tensor in tensors:
        if isinstance(tensor, (list, tuple)):
            check_tensors(op, tensor, device_type, dtypes)
            continue
        if isinstance(tensor, dist.P2POp):
            tensor = tensor.tensor
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.device.type != device_type:
            raise CollectivePlacementError(f"{op}: a {tensor.device.type} tensor on a process group for "
                                           f"{device_type} tensors")
        if tensor.dtype not in dtypes:
            raise CollectivePlacementError(f"{op}: {tensor.dtype} is not an element type the backend reduces")


def _checked(op: str, fn: Callable, device_type: str, dtypes: frozenset[torch.dtype]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        check_tensors(op, [*args, *kwargs.values()], device_type, dtypes)
        return fn(*args, **kwargs)

    wrapper._polytrain_checked = True
    return wrapper


def install_check(device_type: str) -> str | None:
    """With POLYTRAIN_CHECK_COLLECTIVES set to a backend's name (gloo, nccl, hccl), wrap torch.distributed's
    collectives so each checks its tensors (on `device_type`, of that backend's element types). Returns the name."""
    table_name = os.environ.get(CHECK_ENV, "")
    if not table_name:
        return None
    from polytrain.backends import collective_dtypes

    dtypes = collective_dtypes(table_name)
    for op in CHECKED:
        fn = getattr(dist, op, None)  # all_gather_single / reduce_scatter_single: torch >= 2.13
        if fn is not None and not getattr(fn, "_polytrain_checked", False):
            setattr(dist, op, _checked(op, fn, device_type, dtypes))
    return table_name
