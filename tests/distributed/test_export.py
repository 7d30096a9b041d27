"""Export of a checkpoint saved by 2 ranks (dp_shard=2, ep=2): the DCP metadata is read once, however many tensors
there are, and writing the shards in parallel processes gives the same files as writing them one by one."""

from __future__ import annotations

import hashlib
import json

import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.distributed.harness import run, write_job


def test_export_reads_the_metadata_once_and_parallel_workers_write_the_same_files(tmp_path, monkeypatch):
    from polytrain.train.export import export_run

    run(write_job(tmp_path), tmp_path / "run", 2, "parallel.dp_shard=2", "parallel.ep=2", "train.steps=2",
        "checkpoint.every=2")
    assert len(list((tmp_path / "run" / "checkpoints" / "step_00000002").glob("*.distcp"))) == 2

    reads = []
    original = FileSystemReader.read_metadata

    def counted(self, *args, **kwargs):
        reads.append(self.path)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemReader, "read_metadata", counted)
    out, step = export_run(tmp_path / "run", tmp_path / "one", dtype=torch.float32,
                           max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert step == 2 and len(index["weight_map"]) > 30 and len(set(index["weight_map"].values())) > 2
    assert len(reads) == 1, reads

    parallel, _ = export_run(tmp_path / "run", tmp_path / "three", dtype=torch.float32,
                             max_shard_bytes=200_000, workers=3)

    def digests(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}

    assert digests(parallel) == digests(out)
