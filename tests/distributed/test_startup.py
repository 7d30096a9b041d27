"""Real-size start-up, at small size: every rank builds the model on the meta device, allocates and initialises only
its shards, and reads from a Hugging Face checkpoint only the slices it holds. Loaded parameters are bit-identical
to a single-process load; peak host memory per rank follows the checkpoint's share, not its size."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
startup_memory = importlib.import_module("startup_memory")

GATHER = """
import json, sys, torch
from polytrain.config import build_config
from polytrain.train.trainer import Trainer
trainer = Trainer(build_config(json.loads(sys.argv[1])), overwrite=True)
state = {}
for name, tensor in trainer.model.state_dict().items():
    state[name] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
if trainer.runtime.rank == 0:
    torch.save(state, sys.argv[2])
trainer.runtime.close()
from polytrain.parallel.runtime import exit_process
exit_process(0)  # not through the interpreter's shutdown (see there)
"""


@pytest.mark.parametrize(("model", "layout"), [
    ("tiny-v3", {"dp_shard": 4, "ep": 2}),
    ("tiny-v3", {"dp_shard": 2, "tp": 2}),
    ("tiny-v4", {"dp_shard": 2, "tp": 2, "sequence_parallel": False}),
], ids=["dp_shard4-ep2", "dp_shard2-tp2", "v4-dp_shard2-tp2"])
def test_loading_under_a_layout_is_bit_identical_to_one_process(tmp_path, model, layout):
    """(V4's attention sinks, split by head under tensor parallelism, are initialised to zero: set to distinct
    values here so that their slices are checked.)"""
    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.hf import HFCheckpoint, load_hf_weights, save_hf

    config = model_config_from_table({"preset": model})
    source = build_model(config, "cpu", seed=7)
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    save_hf(source, tmp_path / "hf", dtype=torch.float32, max_shard_bytes=2**20)
    single = build_model(HFCheckpoint(tmp_path / "hf").model_config, "cpu", seed=None)
    load_hf_weights(single, HFCheckpoint(tmp_path / "hf"))
    spec = startup_memory.job(tmp_path / "hf", tmp_path / "run", layout)
    spec["model"] = {}
    startup_memory.launch(4, ["-c", GATHER, json.dumps(spec), str(tmp_path / "gathered.pt")])
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    expected = single.state_dict()
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name


def test_peak_host_memory_per_rank_follows_the_checkpoint_share(tmp_path):
    """4 ranks start from a checkpoint of S bytes: each peaks at most S / 4 + 256 MiB over its own baseline (data,
    tokenizer, read buffers, bookkeeping), where holding the model whole would take S."""
    size = startup_memory.make_checkpoint(tmp_path / "hf", hidden=768)
    share, bound = size / 4 / 2**20, 256.0
    assert share + bound < size / 2**20  # a rank holding the whole model could not pass
    for layout in ({"dp_shard": 4}, {"dp_shard": 4, "ep": 2}):
        ranks = startup_memory.start(tmp_path / "hf", tmp_path, 4, layout)
        worst = max(r["over_baseline_mib"] for r in ranks)
        assert worst <= share + bound, (layout, worst, share, ranks)
        local = max(r["local_parameters_mib"] for r in ranks)
        assert local <= 1.05 * share, (layout, local, share)


def test_meta_construction_allocates_only_the_local_shard(tmp_path):
    """The same job as above with random initialisation: each rank's parameters are a quarter of the model."""
    spec = startup_memory.job(Path("unused"), tmp_path / "run", {"dp_shard": 4})
    spec.pop("init")
    spec["model"] = startup_memory.model_table(256)
    report = tmp_path / "reports"
    report.mkdir()
    startup_memory.launch(4, [startup_memory.__file__, "--worker", json.dumps(spec), str(report)])
    from polytrain.models import build_model, model_config_from_table

    total = sum(p.numel() * 4 for p in build_model(model_config_from_table(spec["model"]), "meta").parameters())
    for rank in range(4):
        local = json.loads((report / f"rank{rank}.json").read_text())["local_parameters_mib"] * 2**20
        assert local <= 1.05 * total / 4, (rank, local, total)
