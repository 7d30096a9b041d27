"""`polytrain export`: a run's DCP checkpoint -> Hugging Face safetensors, one tensor at a time.

The checkpoint's metadata (read once) gives every tensor's global shape, so the output shards are planned before any
data is read; then each tensor is loaded alone (DCP assembles it from however many ranks saved it), split into its
HF tensors, written, and dropped. Peak memory is about the largest single tensor (a layer's stacked experts) per
worker, never the model. With `workers` > 1, worker processes write the shards in parallel, each reusing the
metadata read by the parent.

A language-model run exports as the family's causal LM; a reward-model run (`run.algorithm = "rm"`) as the family's
sequence-classification model: its scalar head becomes `score.weight` [1, hidden], the output head and MTP modules
(unused by the reward) are left out, and config.json names the class with one label and the padding token (the
reward is read at the last token that is not padding). Either way the run's tokenizer and chat template are written
beside the weights (train/export_tokenizer.py).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from polytrain.config import read_run_config
from polytrain.errors import CheckpointError, ConfigError
from polytrain.models.common.config import ModelConfig
from polytrain.models.hf.checkpoint import INDEX, KEEP_FP32, _commit, _shard_plan, _start
from polytrain.models.hf.config import hf_config_from_model
from polytrain.models.hf.names import names_for
from polytrain.models.hf.safetensors_io import StreamingWriter, tensor_bytes
from polytrain.models.registry import families, spec_for, spec_for_architecture
from polytrain.train.checkpoint import _dcp_quiet, checkpoint_root, latest_checkpoint, problems, step_dir
from polytrain.train.export_tokenizer import ExportTokenizer

Entry = tuple[str, torch.dtype, tuple[int, ...]]
REWARD_HEAD = {"score_head.weight": "score.weight"}
"""polytrain name -> transformers' name of a reward model's scalar head."""


class MetadataOnce(FileSystemReader):
    """A DCP reader that serves the metadata it was given (read once by the caller) instead of re-reading it
    for every tensor: the metadata of a large job's checkpoint grows with ranks x tensors."""

    def __init__(self, path: str, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class _Exporter:
    """The export plan of one checkpoint: which HF tensor comes from which polytrain tensor, in which dtype."""

    def __init__(self, path: Path, metadata: Metadata, model_config: ModelConfig, dtype: torch.dtype,
                 reward: bool = False) -> None:
        self.path, self.metadata = path, metadata
        self.shapes = {key[len("model."):]: meta for key, meta in metadata.state_dict_metadata.items()
                       if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
        self.names = names_for(model_config)
        metas = {name: torch.empty(tuple(info.size), dtype=info.properties.dtype, device="meta")
                 for name, info in self.shapes.items()}
        plan: list[tuple[str, str, int]] = []  # (hf name, polytrain name, index of the piece)
        for name, tensor in metas.items():
            if name == "lm_head.weight" and (model_config.tie_word_embeddings or reward):
                continue
            if reward and name.startswith("mtp."):
                continue
            if name in REWARD_HEAD:
                plan.append((REWARD_HEAD[name], name, -1))
                continue
            plan += [(hf, name, i) for i, (hf, _) in enumerate(self.names.to_hf(name, tensor))]
        if not reward:
            source_of_copy = {id(metas["embed_tokens.weight"]): "embed_tokens.weight"}
            if "lm_head.weight" in metas:
                source_of_copy[id(metas["lm_head.weight"])] = "lm_head.weight"
            plan += [(hf, source_of_copy[id(t)], 0) for hf, t in self.names.shared_copies(metas)]
        self.plan = plan

        def out_dtype(hf: str, source: torch.Tensor) -> torch.dtype:
            if not source.is_floating_point():
                return source.dtype
            return torch.float32 if KEEP_FP32.search(hf) else dtype

        self.entries: list[Entry] = [(hf, out_dtype(hf, metas[name]), tuple(self._piece(name, i, metas[name]).shape))
                                     for hf, name, i in plan]
        self._loaded: dict[str, torch.Tensor] = {}

    def _piece(self, name: str, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Piece `index` of the HF tensors of `name` (-1: the tensor itself, renamed)."""
        return tensor if index < 0 else list(self.names.to_hf(name, tensor))[index][1]

    def produce(self, i: int) -> torch.Tensor:
        _, name, index = self.plan[i]
        if name not in self._loaded:
            self._loaded.clear()  # one tensor in memory at a time
            info = self.shapes[name]
            target = torch.empty(tuple(info.size), dtype=info.properties.dtype)
            _dcp_quiet(dcp.load, {"model": {name: target}},
                       storage_reader=MetadataOnce(str(self.path), self.metadata))
            self._loaded[name] = target
        return self._piece(name, index, self._loaded[name]).to(self.entries[i][1])

    def write_shard(self, out: Path, file: str, shard: list[int]) -> dict[str, str]:
        writer = StreamingWriter(out / file, [self.entries[i] for i in shard])
        for i in shard:
            writer.write(self.entries[i][0], self.produce(i))
        writer.close()
        return {self.entries[i][0]: file for i in shard}


_WORKER: _Exporter | None = None


def _init_worker(path: str, metadata: Metadata, model_config: ModelConfig, dtype: torch.dtype, reward: bool) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Exporter(Path(path), metadata, model_config, dtype, reward)


def _write_in_worker(out: str, file: str, shard: list[int]) -> dict[str, str]:
    return _WORKER.write_shard(Path(out), file, shard)


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, workers: int = 1) -> tuple[Path, int]:
    """Write the checkpoint of `step` (default: newest) as a Hugging Face model directory (weights, config.json,
    tokenizer files); returns (out, step)."""
    config = read_run_config(run_dir)
    reward = config.run.algorithm == "rm"
    reward_class = getattr(spec_for(config.model).hf, "hf_reward_class", None) if reward else None
    if reward and reward_class is None:
        able = [f for f in families() if getattr(spec_for_architecture(f).hf, "hf_reward_class", None)]
        raise ConfigError(f"{run_dir} is a reward model of the {config.model.architecture} family, which transformers "
                          f"has no sequence-classification class for; reward models export for: {', '.join(able)}")
    root = checkpoint_root(run_dir, config.checkpoint.dir)
    path = step_dir(root, step) if step is not None else latest_checkpoint(root)
    if path is None or not path.is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoint{f' for step {step}' if step is not None else ''}")
    found = problems(path, check_sums=False)
    if found:
        raise CheckpointError(f"checkpoint {path} is incomplete: {'; '.join(found)}")
    if workers < 1:
        raise CheckpointError(f"--workers must be >= 1, got {workers}")
    tokenizer = ExportTokenizer(config.data.tokenizer, config.data.chat_template)
    if reward and tokenizer.special.pad is None:
        raise ConfigError(f"{config.data.tokenizer}: no padding token that no conversation ends on, which a reward "
                          "model's export needs (transformers reads the reward at the last token that is not padding)")
    metadata = FileSystemReader(str(path)).read_metadata()
    exporter = _Exporter(path, metadata, config.model, dtype, reward)
    out = Path(out)
    partial = _start(out, overwrite)
    shards = _shard_plan(exporter.entries, max_shard_bytes)
    files = [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    if workers == 1 or len(shards) == 1:
        for file, shard in zip(files, shards):
            weight_map.update(exporter.write_shard(partial, file, shard))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(shards)), mp_context=context, initializer=_init_worker,
                                 initargs=(str(path), metadata, config.model, dtype, reward)) as pool:
            for part in pool.map(_write_in_worker, [str(partial)] * len(shards), files, shards):
                weight_map.update(part)
    total = sum(tensor_bytes(shape, entry_dtype) for _, entry_dtype, shape in exporter.entries)
    (partial / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = hf_config_from_model(config.model, str(dtype).replace("torch.", ""))
    hf_config.update(tokenizer.special.ids)
    if reward:
        hf_config.update(architectures=[reward_class], num_nextn_predict_layers=0, id2label={"0": "LABEL_0"},
                         label2id={"LABEL_0": 0})
    (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.write(partial, config.model.max_position_embeddings, language_model=not reward)
    _commit(partial, out)
    return out, int(path.name.split("_")[1])
