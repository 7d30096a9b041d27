"""What one rank of a dry run holds and sends: peak memory by category and the collectives it issues.

One dispatch mode (`StepObserver`) sees every op of the step once and feeds two books:

- `MemoryBook` follows every tensor storage the step creates (a storage's bytes count until it is freed or
  resized to nothing, as FSDP frees unsharded parameters) and keeps each category's bytes at the moment of the
  peak. A storage's category: parameters (this rank's shards, known before the step), optimizer state (created
  before the step, as in every step but the first), frozen models (a reference model, teachers), gradients (what
  autograd accumulates into a parameter's .grad, the unsharded gradients FSDP keeps between micro-batches, and its
  reduce-scattered shards), communication buffers (what
  a collective reads or writes: FSDP's gathered parameters and the gradients it reduce-scatters, expert-parallel token
  exchanges, pipeline transfers), activations (made in forward, kept for backward until freed) and temporaries
  (made in backward or the optimizer step).
- `CollectiveBook` counts every c10d and functional collective op by its process group, named after the mesh
  dimension it spans, with the bytes of its largest buffer (an all-gather's output, a reduce-scatter's input).

With fake tensors the mode also answers the two questions that need values (`.item()` and friends, and
`torch.equal`) with placeholders (see `polytrain.dryrun.fake`), and runs fp32 grouped matrix products, whose meta
kernel accepts bf16 only, on bf16 copies.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
SKIPPED = ("wait", "barrier", "monitored_barrier")
CATEGORIES = ("parameters", "gradients", "optimizer state", "frozen models", "communication buffers", "activations",
              "temporaries")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the wrapper's own storage has the global size), else the tensor."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def local_bytes(value: Any) -> int:
    """Bytes of a tensor or (nested) list of tensors as this rank holds them (DTensors: their local shards)."""
    return sum(_local(t).numel() * _local(t).element_size() for t in _tensors(value))


class MemoryBook:
    """Live bytes by category, and the categories at the peak (see the module docstring)."""

    def __init__(self, offload: bool = False) -> None:
        self.live: dict[int, list[Any]] = {}  # id(storage) -> [weakref, bytes, category]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_by_category = dict(self.totals)
        self.offload = offload
        self.host_gradients: dict[int, int] = {}  # id(storage) -> bytes: the sharded gradients (offload)
        self.device_peak = 0
        """The peak of what stays on the device: with `offload` (FSDP's CPU offload) the sharded parameters,
        their gradients and the optimizer state live in host memory, the rest on the device."""
        self.phase = "step"

    def add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = [weakref.ref(storage, lambda _ref, key=key: self._drop(key)), size, category]
        self.totals[category] += size
        self._update_peak()

    def _drop(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self.host_gradients.pop(key, None)
        if entry is not None:
            self.totals[entry[2]] -= entry[1]

    def host_bytes(self) -> int:
        """Bytes in host memory under `offload`: the sharded parameters, the sharded gradients (what FSDP's
        reduce-scatters write, which it moves to the host; the unsharded gradients of a layer being reduced, or
        accumulated over micro-batches, are on the device) and the optimizer state."""
        if not self.offload:
            return 0
        t = self.totals
        return t["parameters"] + sum(self.host_gradients.values()) + t["optimizer state"]

    def _update_peak(self) -> None:
        total = sum(self.totals.values())
        if total > self.peak:
            self.peak = total
            self.peak_by_category = dict(self.totals)
        self.device_peak = max(self.device_peak, total - self.host_bytes())

    def tag(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count the storages of `tensors` (local shards of DTensors) as `category` from now on."""
        for tensor in tensors:
            storage = _local(tensor).untyped_storage()
            entry = self.live.get(id(storage))
            if entry is None:
                self.add(storage, category)
            elif entry[2] != category:
                self.totals[entry[2]] -= entry[1]
                entry[2] = category
                self.totals[category] += entry[1]

    def resized(self, storage: torch.UntypedStorage) -> None:
        entry = self.live.get(id(storage))
        if entry is None:
            return
        size = storage.nbytes()
        self.totals[entry[2]] += size - entry[1]
        entry[1] = size
        if id(storage) in self.host_gradients:
            self.host_gradients[id(storage)] = size
        self._update_peak()

    def made(self, out: Any) -> None:
        """Outputs of an op that is not a collective."""
        backward = torch._C._current_graph_task_id() != -1
        category = "temporaries" if backward or self.phase == "optimizer" else "activations"
        for tensor in _tensors(out):
            self.add(_local(tensor).untyped_storage(), category)

    def collective(self, name: str, args: tuple, out: Any) -> None:
        if "reduce_scatter" in name and args:  # FSDP: (sharded gradient output, unsharded input, ...)
            self.tag(_tensors(args[0]), "gradients")
            if self.offload:
                for tensor in _tensors(args[0]):
                    storage = _local(tensor).untyped_storage()
                    self.host_gradients[id(storage)] = storage.nbytes()
            self.tag([t for a in args[1:] for t in _tensors(a)], "communication buffers")
        else:
            self.tag([t for a in (*args, out) for t in _tensors(a)], "communication buffers")

    def watch_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Count what autograd accumulates into each parameter's .grad as gradients."""
        for param in parameters:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(lambda p: self.tag([p.grad], "gradients"))


class CollectiveBook:
    """Collectives by (operation, group): calls and bytes of their largest buffer."""

    def __init__(self, group_names: dict[str, str]) -> None:
        self.group_names = group_names
        self.calls: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def _group(self, args: tuple, kwargs: dict) -> str:
        for value in (*args, *kwargs.values()):
            if isinstance(value, str) and value in self.group_names:
                return self.group_names[value]
            if isinstance(value, torch.ScriptObject):  # a ProcessGroup as c10d ops carry it
                value = torch.distributed.ProcessGroup.unbox(value)
            name = getattr(value, "group_name", None)
            if isinstance(name, str):
                if name in self.group_names:
                    return self.group_names[name]
                return f"{torch.distributed.get_world_size(value)}-rank group"
        return "default"

    def record(self, name: str, args: tuple, kwargs: dict) -> None:
        if name.startswith(SKIPPED):
            return
        entry = self.calls[(name.rstrip("_"), self._group(args, kwargs))]
        entry[0] += 1
        entry[1] += max((local_bytes(arg) for arg in args), default=0)

    def table(self) -> list[dict[str, Any]]:
        return [{"op": op, "group": group, "count": count, "bytes": size}
                for (op, group), (count, size) in sorted(self.calls.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


class StepObserver(TorchDispatchMode):
    """The one dispatch mode of a dry run's step (see the module docstring). `placeholders`: answer value
    questions with placeholders (fake tensors); `record` = False keeps no books (set-up before the step)."""

    def __init__(self, group_names: dict[str, str], placeholders: bool, record: bool = True,
                 offload: bool = False) -> None:
        super().__init__()
        self.memory = MemoryBook(offload)
        self.collectives = CollectiveBook(group_names)
        self.placeholders = placeholders
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.placeholders:
            if func is torch.ops.aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
            if func is torch.ops.aten.equal.default:  # a consistency check between two value-less tensors
                return True
            if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float32:
                # The meta kernel accepts bf16 only (the CPU kernel runs fp32 too): the same shapes, in fp32.
                low = [a.to(torch.bfloat16) for a in args[:2]]
                out = func(*low, *args[2:], **kwargs).to(torch.float32)
                if self.record:
                    self.memory.made(out)
                return out
        out = func(*args, **kwargs)
        if not self.record:
            return out
        if func.namespace in NAMESPACES:
            name = func._schema.name.split("::")[-1]
            self.collectives.record(name, args, kwargs)
            self.memory.collective(name, args, out)
        else:
            self.memory.made(out)
        return out

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        previous, self.memory.phase = self.memory.phase, phase
        try:
            yield
        finally:
            self.memory.phase = previous

    @contextlib.contextmanager
    def watching_resizes(self) -> Iterator[None]:
        """FSDP frees and re-allocates unsharded parameters by resizing their storage in place."""
        original = torch.UntypedStorage.resize_
        memory = self.memory

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            memory.resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original


@contextlib.contextmanager
def watching_unsharded_gradients(memory: MemoryBook) -> Iterator[None]:
    """FSDP keeps a module's unsharded gradients across the micro-batches of a step (gradient reduction once per
    step): count them as gradients, not as the backward temporaries they are made as. They are known to FSDP's
    per-parameter state only (a private class of torch 2.9 - 2.13, looked up defensively)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError:
        yield
        return
    originals = {name: getattr(FSDPParam, name, None)
                 for name in ("to_accumulated_grad_if_needed", "accumulate_unsharded_grad_if_needed")}

    def wrap(original: Any) -> Any:
        def tagged(self: Any) -> None:
            original(self)
            kept = [getattr(self, "unsharded_accumulated_grad", None),
                    getattr(getattr(self, "_unsharded_param", None), "grad", None)]
            memory.tag([t for t in kept if isinstance(t, torch.Tensor)], "gradients")
        return tagged

    for name, original in originals.items():
        if original is not None:
            setattr(FSDPParam, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is not None:
                setattr(FSDPParam, name, original)


def group_names(meshes: Any) -> dict[str, str]:
    """Process-group name -> the mesh dimension(s) it spans ("dp_shard", "ep", ...), from the job's meshes."""
    import torch.distributed as dist

    names: dict[str, str] = {}
    if meshes is None:
        return names
    for mesh in (meshes.dense, meshes.moe):
        for dim in mesh.mesh_dim_names or ():
            if mesh[dim].size() > 1:
                names.setdefault(mesh[dim].get_group().group_name, dim)
    if meshes.dims.cp > 1:
        names.setdefault(meshes.shard_cp.get_group().group_name, "dp_shard x cp")
    names.setdefault(meshes.token_group().group_name, "dp x cp" if meshes.dims.cp > 1 else "dp")
    names.setdefault(dist.group.WORLD.group_name, "world")
    return names
