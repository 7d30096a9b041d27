"""One reader for every dataset path: (where, record) pairs, `where` naming the record's place for error messages.

Accepted paths:
  - a JSON Lines file (`.jsonl`, or any suffix not listed below): `file:line`, lines counted from 1;
  - a `.json` file: a JSON array of records (`file, record N`, N from 0) or JSON Lines (what `Dataset.to_json`
    writes);
  - a `.parquet` or `.arrow` file (needs pyarrow): `file, row N`, N from 0 as `Dataset[N]`;
  - a directory of such files, all of one kind, read in name order (other files, such as a README, are ignored);
  - a `datasets` `save_to_disk` directory (`state.json` and `data-*.arrow` shards); a `DatasetDict` directory needs
    its split named: `path/train`.

Records are read as they are needed, never the whole file at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polytrain.data.columnar import read_arrow, read_parquet
from polytrain.errors import DataError

KINDS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
"""Data file suffix -> kind (a directory holds one kind)."""
CHUNK = 1 << 20
"""Characters read at a time from a JSON array file."""
MAX_RECORD = 64 * CHUNK
"""Characters of one JSON array element past which a record that does not parse is reported as invalid (rather
than read on to the end of the file)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None


def _json_array(path: str | Path, handle: Any) -> Iterator[tuple[str, Any]]:
    """The elements of the JSON array `handle` holds, decoded one at a time from a sliding buffer."""
    decoder, buffer, pos, eof, index = json.JSONDecoder(), "", 0, False, 0

    def fill() -> bool:
        nonlocal buffer, pos, eof
        chunk = handle.read(CHUNK)
        buffer, pos, eof = buffer[pos:] + chunk, 0, not chunk
        return bool(chunk)

    def skip_space() -> str:
        """The next non-blank character ('' at the end of the file)."""
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos].isspace():
                pos += 1
            if pos < len(buffer) or not fill():
                return buffer[pos : pos + 1]

    skip_space()
    pos += 1  # the opening `[`
    if skip_space() == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(buffer, pos)
            complete = end < len(buffer) or eof  # a value touching the buffer's end may go on (a long number)
        except json.JSONDecodeError as err:
            if eof or len(buffer) - pos > MAX_RECORD:
                raise DataError(f"{path}, record {index}: invalid JSON ({err.msg})") from None
            complete = False
        if not complete:
            fill()
            continue
        yield f"{path}, record {index}", record
        pos, index = end, index + 1
        separator = skip_space()
        if separator == "]":
            return
        if separator != ",":
            found = f"found {separator!r}" if separator else "the file ends"
            raise DataError(f"{path}, record {index}: invalid JSON (expected ',' or ']' after a record, {found})")
        pos += 1
        skip_space()


def read_json(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Records of a `.json` file: a JSON array, or JSON Lines."""
    first = ""
    with Path(path).open(encoding="utf-8") as handle:
        while not first:
            chunk = handle.read(4096)
            if not chunk:
                break
            first = chunk.lstrip()[:1]
    if first != "[":
        for number, record in read_jsonl(path):
            yield f"{path}:{number}", record
        return
    with Path(path).open(encoding="utf-8") as handle:
        yield from _json_array(path, handle)


def _read_file(path: str | Path) -> Iterator[tuple[str, Any]]:
    kind = KINDS.get(Path(path).suffix.lower())
    if kind == "parquet":
        yield from read_parquet(path)
    elif kind == "arrow":
        yield from read_arrow(path)
    elif Path(path).suffix.lower() == ".json":
        yield from read_json(path)
    else:
        for number, record in read_jsonl(path):
            yield f"{path}:{number}", record


def _saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow shards of a `save_to_disk` directory, in the order `state.json` lists them."""
    try:
        state = json.loads((path / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(p.name for p in path.glob("data-*.arrow"))
    return [path / name for name in names]


def _splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [str(s) for s in splits]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())


def dataset_files(path: str | Path) -> list[Path]:
    """The data files a dataset path stands for, in reading order; one-line errors for what cannot be read."""
    folder = Path(path)
    if not folder.exists():
        parent = folder.parent
        if (parent / "dataset_dict.json").is_file():
            raise DataError(f"{path}: the DatasetDict {parent} has no split `{folder.name}` "
                            f"(splits: {', '.join(_splits(parent))})")
        raise DataError(f"data file not found: {folder}")
    if not folder.is_dir():
        return [Path(path)]
    if (folder / "dataset_dict.json").is_file():
        splits = _splits(folder)
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}: name one, e.g. "
                        f"{Path(path) / (splits[0] if splits else 'train')}")
    if (folder / "state.json").is_file():
        files = _saved_dataset_files(folder)
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise DataError(f"{path}: a saved dataset whose data files are missing ({', '.join(missing) or 'none'})")
        return files
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in KINDS)
    kinds = sorted({KINDS[p.suffix.lower()] for p in files})
    if len(kinds) > 1:
        examples = ", ".join(next(p.name for p in files if KINDS[p.suffix.lower()] == k) for k in kinds)
        raise DataError(f"{path}: the directory mixes {' and '.join(kinds)} files ({examples}); keep one kind")
    if not files:
        folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        inside = f" (it holds the directories {', '.join(folders)}: name one)" if folders else ""
        raise DataError(f"{path}: no .parquet, .arrow, .json or .jsonl files in the directory{inside}")
    return files


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of the dataset at `path` (see the module docstring for the formats)."""
    for file in dataset_files(path):
        yield from _read_file(path if file == Path(path) else file)


def empty_dataset(path: str | Path) -> DataError:
    """The error for a dataset with no records."""
    files = dataset_files(path)
    text = all(KINDS.get(f.suffix.lower(), "json") == "json" for f in files)
    return DataError(f"{path}: dataset is empty ({'no JSON lines' if text else 'no records'})")
