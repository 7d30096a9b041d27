"""`polytrain export`: a run's DCP checkpoint -> Hugging Face safetensors, one tensor at a time.

The checkpoint's metadata gives every tensor's global shape, so the output shards are planned before any data is
read; then each tensor is loaded alone (DCP assembles it from however many ranks saved it), split into its HF
tensors, written, and dropped. Peak memory is about the largest single tensor (a layer's stacked experts), never
the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from polytrain.config import read_run_config
from polytrain.errors import CheckpointError
from polytrain.models.hf.checkpoint import KEEP_FP32, _commit, _start, write_shards
from polytrain.models.hf.config import hf_config_from_model
from polytrain.models.hf.names import names_for
from polytrain.train.checkpoint import _dcp_quiet, checkpoint_root, latest_checkpoint, problems, step_dir


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> tuple[Path, int]:
    """Write the checkpoint of `step` (default: newest) as a Hugging Face model directory; returns (out, step)."""
    import torch.distributed.checkpoint as dcp

    config = read_run_config(run_dir)
    root = checkpoint_root(run_dir, config.checkpoint.dir)
    path = step_dir(root, step) if step is not None else latest_checkpoint(root)
    if path is None or not path.is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoint{f' for step {step}' if step is not None else ''}")
    found = problems(path, check_sums=False)
    if found:
        raise CheckpointError(f"checkpoint {path} is incomplete: {'; '.join(found)}")
    metadata = FileSystemReader(str(path)).read_metadata()
    shapes = {key[len("model."):]: meta for key, meta in metadata.state_dict_metadata.items()
              if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    model_config = config.model
    names = names_for(model_config)

    def meta_tensor(name: str) -> torch.Tensor:
        info = shapes[name]
        return torch.empty(tuple(info.size), dtype=info.properties.dtype, device="meta")

    plan: list[tuple[str, str, int]] = []  # (hf name, polytrain name, index of the piece)
    metas = {name: meta_tensor(name) for name in shapes}
    for name, tensor in metas.items():
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue
        plan += [(hf, name, i) for i, (hf, _) in enumerate(names.to_hf(name, tensor))]
    copies = list(names.shared_copies(metas))
    source_of_copy = {id(metas["embed_tokens.weight"]): "embed_tokens.weight"}
    if "lm_head.weight" in metas:
        source_of_copy[id(metas["lm_head.weight"])] = "lm_head.weight"
    plan += [(hf, source_of_copy[id(t)], 0) for hf, t in copies]

    def out_dtype(hf: str, source: torch.Tensor) -> torch.dtype:
        if not source.is_floating_point():
            return source.dtype
        return torch.float32 if KEEP_FP32.search(hf) else dtype

    def piece(name: str, index: int, tensor: torch.Tensor) -> torch.Tensor:
        return list(names.to_hf(name, tensor))[index][1]

    entries = [(hf, out_dtype(hf, metas[name]), tuple(piece(name, i, metas[name]).shape)) for hf, name, i in plan]
    loaded: dict[str, torch.Tensor] = {}

    def produce(i: int) -> torch.Tensor:
        _, name, index = plan[i]
        if name not in loaded:
            loaded.clear()  # one tensor in memory at a time
            target = torch.empty(tuple(shapes[name].size), dtype=shapes[name].properties.dtype)
            _dcp_quiet(dcp.load, {"model": {name: target}}, checkpoint_id=str(path))
            loaded[name] = target
        return piece(name, index, loaded[name]).to(entries[i][1])

    out = Path(out)
    partial = _start(out, overwrite)
    write_shards(partial, entries, produce, max_shard_bytes)
    (partial / "config.json").write_text(json.dumps(hf_config_from_model(model_config,
                                                                        str(dtype).replace("torch.", "")), indent=2))
    _commit(partial, out)
    return out, int(path.name.split("_")[1])
