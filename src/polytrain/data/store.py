"""A compact store of tokenised sequences: token ids (int32) and loss masks (uint8) in two flat, memory-mapped
temporary files, plus an int64 offset per sequence.

A tokenised dataset costs 5 bytes a token on disk and a few bytes a sequence in memory; the operating system pages
the tokens in as samples are read and can drop them again under memory pressure, so a dataset larger than memory
trains. The files live in the system temporary directory (`$TMPDIR`: point it at a local disk with room) and
disappear when the process ends.
"""

from __future__ import annotations

import tempfile
from array import array
from collections.abc import Sequence
from typing import IO, TypeVar, overload

import numpy as np

FLUSH_TOKENS = 1 << 20
"""Tokens gathered in memory before they are appended to the files."""

T = TypeVar("T")


class StoredSequence(Sequence[T]):
    """A dataset's items built on demand (`item(i)`, from a `TokenStore`): negative indices count from the end, a
    slice is a list of items."""

    def item(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        length = len(self)
        if isinstance(index, slice):
            return [self.item(i) for i in range(*index.indices(length))]
        i = index + length if index < 0 else index
        if not 0 <= i < length:
            raise IndexError(f"item {index} of {length}")
        return self.item(i)


class TokenStore:
    """Append sequences with `append`, then `close` once; `tokens(i)` reads sequence i back (memory-mapped)."""

    def __init__(self) -> None:
        self._files: tuple[IO[bytes], IO[bytes]] = (tempfile.TemporaryFile(), tempfile.TemporaryFile())  # noqa: SIM115 (closed by close())
        self._offsets = array("q", [0])
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_tokens = 0
        self._ids: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self.max_id = -1
        """The largest token id appended."""

    def append(self, ids: list[int], mask: list[bool]) -> None:
        array_ids = np.asarray(ids, dtype=np.int64)
        if array_ids.size:
            self.max_id = max(self.max_id, int(array_ids.max()))
        self._pending.append((array_ids.astype(np.int32), np.asarray(mask, dtype=np.uint8)))
        self._offsets.append(self._offsets[-1] + len(ids))
        self._pending_tokens += len(ids)
        if self._pending_tokens >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            for file, part in zip(self._files, zip(*self._pending)):
                file.write(np.concatenate(part).tobytes())
        self._pending, self._pending_tokens = [], 0

    def close(self) -> None:
        """Finish writing; the store is read-only from here on."""
        self._flush()
        for file in self._files:
            file.flush()
        total = self._offsets[-1]
        if total:
            self._ids = np.memmap(self._files[0], dtype=np.int32, mode="r", shape=(total,))
            self._mask = np.memmap(self._files[1], dtype=np.uint8, mode="r", shape=(total,))
        else:
            self._ids, self._mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)
        for file in self._files:
            file.close()  # the mapping keeps the (already unlinked) file alive

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def length(self, i: int) -> int:
        return self._offsets[i + 1] - self._offsets[i]

    def longest(self) -> int:
        """The length of the longest sequence (0 for an empty store), from the offsets alone."""
        return int(np.diff(np.asarray(self._offsets, dtype=np.int64)).max()) if len(self) else 0

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of sequence i."""
        if self._ids is None:
            raise RuntimeError("TokenStore.close() must be called before reading")
        start, stop = self._offsets[i], self._offsets[i + 1]
        return self._ids[start:stop], self._mask[start:stop]
