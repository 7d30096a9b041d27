"""Records of columnar files: Parquet and Arrow (IPC file or stream, as `datasets.save_to_disk` writes).

Files are read one record batch at a time and turned into Python records a slice of rows at a time, so a file
larger than memory streams through. pyarrow is imported only when such a file is read (`pip install
'polytrain[data]'`). A record is one row as a dict; a null value counts as a missing key (a column of a table that
some records lack is null in those rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from polytrain.errors import DataError

ROWS_PER_SLICE = 1024
"""Rows turned into Python objects at once."""


def pyarrow(path: str | Path) -> ModuleType:
    """The pyarrow module, or a one-line error naming the file that needs it."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading {Path(path).suffix or 'Arrow'} files needs pyarrow: "
                        "pip install 'polytrain[data]'") from None
    return pa


def _rows(batches: Iterable[Any], path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    row = 0
    for batch in batches:
        for start in range(0, batch.num_rows, ROWS_PER_SLICE):
            for record in batch.slice(start, ROWS_PER_SLICE).to_pylist():
                yield f"{path}, row {row}", {key: value for key, value in record.items() if value is not None}
                row += 1


def _unreadable(path: str | Path, kind: str, err: Exception) -> DataError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"{path}: not a readable {kind} file ({reason})")


def read_parquet(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file, row N`, record) for each row of a Parquet file; N counts from 0, as `Dataset[N]` does."""
    pa = pyarrow(path)
    try:
        parquet = pa.parquet.ParquetFile(str(path))
        batches = parquet.iter_batches(batch_size=ROWS_PER_SLICE)
        yield from _rows(batches, path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, "Parquet", err) from None


def _arrow_batches(pa: ModuleType, path: str | Path) -> Iterator[Any]:
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:  # not the random-access file format: an IPC stream (what `datasets` writes)
        yield from pa.ipc.open_stream(source)
        return
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def read_arrow(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file, row N`, record) for each row of an Arrow IPC file or stream, memory-mapped."""
    pa = pyarrow(path)
    try:
        yield from _rows(_arrow_batches(pa, path), path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, "Arrow", err) from None
