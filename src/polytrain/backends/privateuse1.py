"""Any other out-of-tree accelerator that registers itself as PrivateUse1 (torch.utils.backend_registration)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from polytrain.backends.base import AcceleratorBackend
from polytrain.errors import BackendError


def privateuse1_name() -> str:
    return torch._C._get_privateuse1_backend_name()


class PrivateUse1Backend(AcceleratorBackend):
    """Uses whatever device module and collective backend the plugin registered for its device name."""

    collective_dtypes = frozenset({torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32,
                                   torch.bfloat16})
    """Unknown backend: the element types every accelerator collective library polytrain knows reduces."""

    def __init__(self) -> None:
        name = privateuse1_name()
        if name == "privateuseone" or not hasattr(torch, name):
            raise BackendError(
                "--device privateuse1: no out-of-tree accelerator is registered (import its torch plugin first)"
            )
        self.name = name
        self.device_type = name
        try:
            self.dist_backend = dist.get_default_backend_for_device(name)
        except (RuntimeError, ValueError):
            raise BackendError(f"accelerator `{name}` registered no torch.distributed backend") from None

    name = "privateuse1"

    @classmethod
    def handles(cls, device_type: str) -> bool:
        return device_type == privateuse1_name() and device_type != "privateuseone"

    @classmethod
    def create(cls) -> PrivateUse1Backend:
        return cls()  # its own one-line errors (no plugin, no collective backend)

    @classmethod
    def is_available(cls) -> bool:
        name = privateuse1_name()
        module = getattr(torch, name, None)
        return name != "privateuseone" and module is not None and module.is_available()
