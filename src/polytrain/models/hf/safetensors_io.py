"""Reading and writing safetensors one tensor at a time.

`StreamingWriter` writes the header first (it only needs names, dtypes and shapes) and then each tensor's bytes in
order, so writing a shard never holds more than one tensor in memory (safetensors' own `save_file` builds the
whole shard in memory first).

`BlockReader` reads one block of a tensor (a range per dimension) with positioned reads straight into the result:
no memory map, so the file's pages never count towards the process's memory (a memory-mapped read keeps every page
it touched mapped, and a rank loading its shard would appear to hold it twice), and network file systems see
large sequential reads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class BlockReader:
    """Blocks of the tensors of one safetensors file, read with `os.pread` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, length, 8))
        except (struct.error, ValueError) as err:
            os.close(self._fd)
            raise ValueError(f"{self.path}: not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = header

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def read(self, name: str, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Tensor `name`'s block [lo, hi) per dimension, as a new tensor."""
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"no tensor `{name}`")
        shape = tuple(entry["shape"])
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"tensor `{name}` has element type {entry['dtype']}, which polytrain does not read")
        if len(bounds) != len(shape) or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(bounds, shape)):
            raise ValueError(f"block {bounds} is outside tensor `{name}` of shape {list(shape)}")
        dtype = DTYPES[entry["dtype"]]
        item = torch.empty((), dtype=dtype).element_size()
        begin = self._data_start + entry["data_offsets"][0]
        out = torch.empty(tuple(hi - lo for lo, hi in bounds), dtype=dtype)
        if out.numel() == 0:
            return out
        if not shape:  # a scalar
            bounds, shape = [(0, 1)], (1,)
        # the block is a set of contiguous runs: everything after the last dimension it does not span whole
        partial = [d for d, ((lo, hi), n) in enumerate(zip(bounds, shape)) if (lo, hi) != (0, n)]
        last = partial[-1] if partial else 0
        run = (bounds[last][1] - bounds[last][0]) * math.prod(shape[last + 1 :]) * item
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        ranges = [range(lo, hi) for lo, hi in bounds[:last]]
        for position, outer in enumerate(itertools.product(*ranges)):
            offset = sum(i * strides[d] for d, i in enumerate(outer)) + bounds[last][0] * strides[last]
            target = buffer[position * run : (position + 1) * run]
            done = 0
            while done < run:  # pread may return fewer bytes than asked
                got = os.preadv(self._fd, [target[done:]], begin + offset * item + done)
                if got <= 0:
                    raise ValueError(f"{self.path}: truncated inside tensor `{name}`")
                done += got
        return out


def tensor_bytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    """Write a safetensors file whose entries (name, dtype, shape) are known up front, tensor by tensor."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.expected:
            size = tensor_bytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        self._file = self.path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.expected[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want_name} {dtype} {shape}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        self._file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self._next} tensors were never written")
