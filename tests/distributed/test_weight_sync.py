"""Streamed weight sync (parallel/weight_sync.py): a model sharded over 4 gloo ranks is sent, bucket by bucket, to a
receiver on one rank; what it receives equals the Hugging Face export of the same weights bit for bit, no bucket is
larger than the limit (unless one tensor alone is), and a bucket's memory is freed before the next one is built."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
startup_memory = importlib.import_module("startup_memory")

BUCKET_BYTES = 256 * 1024

SYNC = """
import gc, json, sys, weakref, torch
from polytrain.config import build_config
from polytrain.parallel.weight_sync import hf_weight_buckets
from polytrain.train.trainer import Trainer
trainer = Trainer(build_config(json.loads(sys.argv[1])), overwrite=True)
received, sizes, alive_at_next = {}, [], []
previous = None
for bucket in hf_weight_buckets(trainer.model, trainer.config.model, torch.float32, int(sys.argv[3]),
                                receivers=[int(sys.argv[4])]):
    gc.collect()
    alive_at_next.append(previous is not None and previous() is not None)
    sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
    received.update((name, tensor.clone()) for name, tensor in bucket)
    previous = weakref.ref(bucket[0][1]._base) if bucket else None  # the bucket's one buffer
    del bucket
if trainer.runtime.rank == int(sys.argv[4]):
    torch.save({"received": received, "sizes": sizes, "alive": alive_at_next}, sys.argv[2])
else:
    assert not received and not any(sizes), "a rank that hosts no engine received weights"
trainer.runtime.close()
from polytrain.parallel.runtime import exit_process
exit_process(0)  # not through the interpreter's shutdown (see there)
"""


@pytest.mark.parametrize(("model", "layout", "receiver"), [
    ("tiny-v3", {"dp_replicate": 2, "dp_shard": 2, "ep": 2}, 3),
    ("tiny-v4", {"dp_shard": 2, "tp": 2, "sequence_parallel": False}, 1),
], ids=["v3-hsdp2x2-ep2", "v4-dp_shard2-tp2"])
def test_bucketed_sync_of_a_sharded_model_reproduces_the_hf_export(tmp_path, model, layout, receiver):
    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.hf import save_hf

    config = model_config_from_table({"preset": model, "num_nextn_predict_layers": 0})
    source = build_model(config, "cpu", seed=7)
    with torch.no_grad():  # distinct values everywhere (sinks and biases start at zero)
        for name, param in source.named_parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 1e-3)
    save_hf(source, tmp_path / "hf", dtype=torch.float32, max_shard_bytes=2**30)
    expected = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        expected.update(load_file(file))

    spec = startup_memory.job(tmp_path / "hf", tmp_path / "run", layout)
    spec["model"] = {}
    out = tmp_path / "received.pt"
    startup_memory.launch(4, ["-c", SYNC, json.dumps(spec), str(out), str(BUCKET_BYTES), str(receiver)])
    result = torch.load(out, weights_only=True)
    received = result["received"]

    assert received.keys() == expected.keys()
    for name, tensor in expected.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    largest = max(t.numel() * t.element_size() for t in expected.values())
    assert len(result["sizes"]) > 3 and max(result["sizes"]) <= max(BUCKET_BYTES, largest)
    assert not any(result["alive"]), "a bucket was still allocated when the next one arrived"
