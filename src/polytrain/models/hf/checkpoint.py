"""Hugging Face checkpoint directories: lazy reading with dequantisation, loading into a polytrain model,
export from a polytrain model, and streaming FP8 / FP4 -> bf16 conversion.

Every reader works tensor by tensor through `safe_open` (memory-mapped), so peak host memory stays near the
largest tensor, whatever the model size. Every writer writes into `<out>.partial/` and renames it to `<out>` only
once complete, so an interrupted export never leaves a directory that looks like a valid checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from polytrain.errors import CheckpointError
from polytrain.models.common.config import ModelConfig
from polytrain.models.common.init import LocalIndices, full_indices
from polytrain.models.hf.config import hf_config_from_model, model_config_from_hf
from polytrain.models.hf.names import names_for
from polytrain.models.hf.quant import MXFP4_BLOCK, dequantize_fp8, dequantize_mxfp4
from polytrain.models.hf.safetensors_io import BlockReader, StreamingWriter, tensor_bytes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors the releases store in fp32 whatever the checkpoint dtype (router bias, mHC maps, sinks, pooling bias).
KEEP_FP32 = re.compile(r"(e_score_correction_bias|gate\.bias|hc_[a-z_]+|hc_head\.hc_[a-z]+|attn_sink|sinks|\.ape|"
                       r"position_bias|\.(fn|base|scale))$")


def _is_scale(name: str) -> bool:
    return name.endswith("_scale_inv") or name.endswith(".scale")


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus one or more safetensors shards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json (is this a Hugging Face model directory?)")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None
        self._handles: dict[str, Any] = {}
        self._readers: dict[str, BlockReader] = {}
        self.weight_map = self._weight_map()
        quant = self.hf_config.get("quantization_config") or {}
        self.fp8_block = int((quant.get("weight_block_size") or [128, 128])[0])

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no `weight_map`")
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are absent: {', '.join(missing)}")
            return weight_map
        if (self.path / SINGLE).is_file():
            return {name: SINGLE for name in self._open(SINGLE).keys()}  # noqa: SIM118 - safe_open is not iterable
        raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{self.path / file}: unreadable or truncated shard ({err})") from None
        return self._handles[file]

    def _slice(self, name: str):
        """A lazily read view of tensor `name` (`view[a:b, c:d]` reads only that block)."""
        return self._open(self.weight_map[name]).get_slice(name)

    def _block(self, name: str, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Tensor `name`'s block [lo, hi) per dimension, read with positioned reads (no memory map)."""
        file = self.weight_map[name]
        if file not in self._readers:
            try:
                self._readers[file] = BlockReader(self.path / file)
            except (ValueError, OSError) as err:
                raise CheckpointError(f"{self.path / file}: unreadable or truncated shard ({err})") from None
        try:
            return self._readers[file].read(name, bounds)
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{self.path / file}: {err}") from None

    def release(self, file: str) -> None:
        """Unmap a shard (its pages stop counting towards this process's memory)."""
        self._handles.pop(file, None)
        reader = self._readers.pop(file, None)
        if reader is not None:
            reader.close()

    @property
    def model_config(self) -> ModelConfig:
        return model_config_from_hf(self.hf_config, str(self.path / "config.json"))

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names(self, file: str | None = None) -> list[str]:
        """Tensor names (scale companions excluded), optionally only those stored in `file`."""
        return [n for n, f in self.weight_map.items() if not _is_scale(n) and (file is None or f == file)]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor `{name}` is not in the checkpoint")
        return self._open(self.weight_map[name]).get_tensor(name)

    def _scale_of(self, name: str) -> str | None:
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        for candidate in (f"{name}_scale_inv", f"{stem}.scale"):
            if candidate in self.weight_map:
                return candidate
        return None

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name`, dequantised if it is stored as block-scaled FP8 or MXFP4."""
        tensor = self.raw(name)
        scale_name = self._scale_of(name)
        try:
            if tensor.dtype == torch.float8_e4m3fn:
                if scale_name is None:
                    raise CheckpointError(f"{self.path}: FP8 tensor `{name}` has no scale tensor")
                tensor = dequantize_fp8(tensor, self.raw(scale_name), self.fp8_block)
            elif tensor.dtype in (torch.int8, torch.uint8) and scale_name is not None:
                tensor = dequantize_mxfp4(tensor, self.raw(scale_name))
        except ValueError as err:
            raise CheckpointError(f"{self.path}: `{name}`: {err}") from None
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def read_part(self, name: str, indices: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The elements of tensor `name` at global `indices` (per dimension, sorted), reading from the file only
        their bounding block: rows / columns outside it are never touched. Block-scaled weights are read block-
        aligned (FP8: the 128 x 128 scale blocks; MXFP4: the 32 inputs per scale) and dequantised as a slice."""
        indices = [index.cpu() for index in indices]  # a sharded tensor's indices live on its device
        part = self._slice(name)
        shape = tuple(part.get_shape())
        if len(indices) != len(shape):
            raise CheckpointError(f"{self.path}: `{name}` has {len(shape)} dimensions, the model expects "
                                  f"{len(indices)}")
        bounds = [(int(index.min()), int(index.max()) + 1) if index.numel() else (0, 0) for index in indices]
        scale_name = self._scale_of(name)
        raw_dtype = part.get_dtype()
        if raw_dtype == "F8_E4M3" and scale_name is None:
            raise CheckpointError(f"{self.path}: FP8 tensor `{name}` has no scale tensor")
        try:
            if raw_dtype == "F8_E4M3":
                block = self.fp8_block
                aligned = [(lo // block * block, min(-(-hi // block) * block, n))
                           for (lo, hi), n in zip(bounds, shape)]
                raw = self._block(name, aligned)
                scales = self._block(scale_name, [(lo // block, -(-hi // block)) for lo, hi in aligned])
                block_tensor = dequantize_fp8(raw, scales, block)
            elif raw_dtype in ("I8", "U8") and scale_name is not None:  # MXFP4: 2 values a byte, 32 a scale
                (r0, r1), (c0, c1) = bounds
                c0, c1 = c0 // MXFP4_BLOCK * MXFP4_BLOCK, -(-c1 // MXFP4_BLOCK) * MXFP4_BLOCK
                aligned = [(r0, r1), (c0, c1)]
                raw = self._block(name, [(r0, r1), (c0 // 2, c1 // 2)])
                scales = self._block(scale_name, [(r0, r1), (c0 // MXFP4_BLOCK, c1 // MXFP4_BLOCK)])
                block_tensor = dequantize_mxfp4(raw, scales)
            else:
                aligned = bounds
                block_tensor = self._block(name, bounds)
        except ValueError as err:
            raise CheckpointError(f"{self.path}: `{name}`: {err}") from None
        for dim, (index, (lo, hi)) in enumerate(zip(indices, aligned)):
            if index.numel() != hi - lo or (index.numel() and int(index[0]) != lo):  # not the whole aligned range
                block_tensor = block_tensor.index_select(dim, index.to(torch.long) - lo)
        return block_tensor.to(dtype) if block_tensor.is_floating_point() else block_tensor

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The logical shape of tensor `name` (dequantised MXFP4 weights count their unpacked columns)."""
        return self.dequantized_dtype(name, torch.float32)[1]

    def dequantized_dtype(self, name: str, dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) that `read(name, dtype)` will return, from the headers only."""
        handle = self._open(self.weight_map[name])
        shape = tuple(handle.get_slice(name).get_shape())
        raw_dtype = handle.get_slice(name).get_dtype()
        if raw_dtype in ("I8", "U8") and self._scale_of(name) is not None:
            return dtype, (shape[0], shape[1] * 2)
        if raw_dtype == "F32" and KEEP_FP32.search(name):
            return torch.float32, shape
        if raw_dtype.startswith(("F", "BF")):
            return dtype, shape
        return {"I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}[raw_dtype], shape


def load_hf_weights(
    model: nn.Module, checkpoint: HFCheckpoint, progress: Callable[[int, int], None] | None = None,
    skip: tuple[str, ...] = (), local_indices: LocalIndices = full_indices, full_model: nn.Module | None = None,
) -> dict[str, int]:
    """Copy the checkpoint's weights into `model` (any dtype / device; sharded or whole), tensor by tensor.

    Each tensor's local part is filled from only the rows / columns it holds (`local_indices`: global indices per
    dimension; for stacked experts, only its experts' tensors are opened), so a rank reads about its shard of the
    checkpoint. `full_model` (default `model`): the whole model, when `model` holds part of it (pipeline stages),
    for the check that every checkpoint tensor has a place. Raises CheckpointError naming the tensor when one is
    missing or has the wrong shape, and lists checkpoint tensors the model has no place for (MTP tensors are
    skipped when the model has no MTP modules).
    """
    config: ModelConfig = model.config
    names = names_for(config)

    def wanted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items()
                if k not in skip and not (config.tie_word_embeddings and k == "lm_head.weight")}

    state = wanted(model.state_dict())
    reads = 0

    def find(hf_name: str) -> str:
        found = next((n for n in names.candidates(hf_name) if n in checkpoint), None)
        if found is None:
            hint = ""
            if names.is_mtp_tensor(hf_name):
                hint = " (the checkpoint has no MTP weights: set model.num_nextn_predict_layers = 0)"
            raise CheckpointError(f"{checkpoint.path}: tensor `{hf_name}` is missing from the checkpoint{hint}")
        return found

    def read(hf_name: str, indices: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal reads
        found = find(hf_name)
        if checkpoint.shape_of(found) != tuple(shape):
            raise CheckpointError(
                f"{checkpoint.path}: tensor `{found}` has shape {checkpoint.shape_of(found)}, the model expects "
                f"{tuple(shape)} (does config.json match the weights?)"
            )
        reads += 1
        return checkpoint.read_part(found, indices)

    with torch.no_grad():
        for done, (name, dest) in enumerate(state.items(), start=1):
            local = dest.to_local() if hasattr(dest, "to_local") else dest
            names.load_into(name, local, read, local_indices(dest), tuple(dest.shape))
            if progress:
                progress(done, len(state))
    placed: set[str] = set()
    for name, tensor in wanted((full_model or model).state_dict()).items():
        shape_only = torch.empty(tuple(tensor.shape), device="meta")
        placed.update(n for hf_name, _ in names.to_hf(name, shape_only)
                      for n in names.candidates(hf_name) if n in checkpoint)
    unused = [
        n for n in checkpoint.names()
        if n not in placed and not names.is_shared_copy(n) and not (not config.num_nextn_predict_layers
                                                                    and names.is_mtp_tensor(n))
    ]
    if unused:
        raise CheckpointError(
            f"{checkpoint.path}: {len(unused)} tensor(s) have no place in the model, e.g. {', '.join(unused[:3])}"
        )
    return {"tensors": reads}


def _shard_plan(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = tensor_bytes(shape, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _commit(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


def _start(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def write_shards(
    out: Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[int], torch.Tensor],
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Write `entries` (tensor i comes from `produce(i)`) into numbered shards under `out`; returns the weight map."""
    plan = _shard_plan(entries, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(plan, start=1):
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        writer = StreamingWriter(out / file, [entries[i] for i in shard])
        for i in shard:
            writer.write(entries[i][0], produce(i))
            weight_map[entries[i][0]] = file
        writer.close()
        if progress:
            progress(number, len(plan))
    total = sum(tensor_bytes(shape, dtype) for _, dtype, shape in entries)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


def save_hf(
    model: nn.Module,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Export `model` as a Hugging Face checkpoint (config.json, index, safetensors shards) that transformers loads."""
    out = Path(out)
    config: ModelConfig = model.config
    names = names_for(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors.extend(names.to_hf(name, tensor))
    tensors.extend(names.shared_copies(state))

    def out_dtype(tensor: torch.Tensor, name: str) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        return torch.float32 if KEEP_FP32.search(name) else dtype

    entries = [(name, out_dtype(t, name), tuple(t.shape)) for name, t in tensors]
    partial = _start(out, overwrite)
    write_shards(partial, entries, lambda i: tensors[i][1].to(entries[i][1]), max_shard_bytes)
    hf_config = hf_config_from_model(config, str(dtype).replace("torch.", ""))
    (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
    _commit(partial, out)
    return out


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Dequantise an FP8 / FP4 Hugging Face checkpoint into `dtype`, shard by shard and tensor by tensor.

    Output shards mirror the input shards (same tensors, scales dropped); config.json loses its
    `quantization_config`. Peak host memory is about one tensor plus the page cache of the shard being read.
    """
    checkpoint = HFCheckpoint(source)
    checkpoint.model_config  # noqa: B018 - validates that the architecture is supported before writing anything
    out = Path(out)
    partial = _start(out, overwrite)
    weight_map: dict[str, str] = {}
    total = 0
    files = checkpoint.files
    for number, file in enumerate(files, start=1):
        names = checkpoint.names(file)
        entries = [(n, *checkpoint.dequantized_dtype(n, dtype)) for n in names]
        writer = StreamingWriter(partial / file, entries)
        for name, tensor_dtype, _ in entries:
            writer.write(name, checkpoint.read(name, tensor_dtype))
            weight_map[name] = file
        writer.close()
        checkpoint.release(file)
        total += sum(tensor_bytes(shape, tensor_dtype) for _, tensor_dtype, shape in entries)
        if progress:
            progress(file, number, len(files))
    (partial / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = dict(checkpoint.hf_config)
    hf_config.pop("quantization_config", None)
    hf_config["torch_dtype"] = str(dtype).replace("torch.", "")
    (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (checkpoint.path / extra).is_file():
            shutil.copy2(checkpoint.path / extra, partial / extra)
    _commit(partial, out)
    return {"tensors": len(weight_map), "shards": len(files), "bytes": total}
