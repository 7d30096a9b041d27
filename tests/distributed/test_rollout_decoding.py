"""The built-in sampler under FSDP (2 gloo ranks, dp_shard=2): with `grpo.sampler_weights = "gathered"` each rank
gathers the weights once for the whole rollout and then decodes alone (no collective per decoded token); with
"sharded" it gathers layer by layer at every step in lockstep. Both sample exactly the tokens one process samples,
and training afterwards sees its parameters sharded again."""

from __future__ import annotations

import importlib
import json
import sys

import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
startup_memory = importlib.import_module("startup_memory")

PROMPTS = [[5, 17, 9, 33], [7, 2], [40, 41, 42, 43, 44, 45], [3, 3, 8]]
NEW_TOKENS = 12

DECODE = """
import json, sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from polytrain.config import build_config
from polytrain.rollout.generate import SamplingConfig
from polytrain.train.trainer import Trainer

calls = {"n": 0}
for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_to_all_single", "broadcast"):
    original = getattr(dist, name)
    def counted(*args, _original=original, **kwargs):
        calls["n"] += 1
        return _original(*args, **kwargs)
    setattr(dist, name, counted)

trainer = Trainer(build_config(json.loads(sys.argv[1])), overwrite=True)
objective = trainer.objective
prompts, new = json.loads(sys.argv[3]), int(sys.argv[4])
counts = []
for tokens in (new // 3, new):  # a short and a long rollout
    calls["n"] = 0
    completions = objective.engine.generate(prompts, SamplingConfig(tokens, 1.0), set(), row_seeds=[11, 12, 13, 14])
    counts.append(calls["n"])
sharded_after = all(g.is_sharded for m in trainer.model.modules() if isinstance(m, FSDPModule)
                    for g in m._get_fsdp_state()._fsdp_param_groups)
if trainer.runtime.rank == 0:
    json.dump({"tokens": [c.tokens for c in completions], "logprobs": [c.logprobs for c in completions],
               "collectives": counts, "sharded_after": sharded_after}, open(sys.argv[2], "w"))
trainer.runtime.close()
from polytrain.parallel.runtime import exit_process
exit_process(0)  # not through the interpreter's shutdown (see there)
"""


def decode(tmp_path, name: str, world: int, layout: dict, weights: str) -> dict:
    spec = startup_memory.job(tmp_path / "hf", tmp_path / name, layout)
    spec["run"]["algorithm"] = "grpo"
    spec["data"]["train_path"] = str(ROOT / "examples" / "data" / "count_train.jsonl")
    spec["grpo"] = {"sampler_weights": weights, "group_size": 2, "max_new_tokens": NEW_TOKENS}
    spec["model"] = {}
    out = tmp_path / f"{name}.json"
    startup_memory.launch(world, ["-c", DECODE, json.dumps(spec), str(out), json.dumps(PROMPTS), str(NEW_TOKENS)])
    return json.loads(out.read_text())


def test_gathered_sampling_decodes_without_per_token_collectives_and_samples_as_one_process(tmp_path):
    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.hf import save_hf

    config = model_config_from_table({"preset": "tiny-v3", "num_nextn_predict_layers": 0})
    save_hf(build_model(config, "cpu", seed=3), tmp_path / "hf", dtype=torch.float32)
    single = decode(tmp_path, "single", 1, {}, "auto")
    gathered = decode(tmp_path, "gathered", 2, {"dp_shard": 2}, "gathered")
    sharded = decode(tmp_path, "sharded", 2, {"dp_shard": 2}, "sharded")

    assert gathered["tokens"] == single["tokens"] == sharded["tokens"]
    for run in (gathered, sharded):
        for ours, theirs in zip(run["logprobs"], single["logprobs"]):
            assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)
    # gathered: the same collectives (one gather of each FSDP module) whatever the number of decoded tokens;
    # sharded: collectives at every decoding step
    short, long = gathered["collectives"]
    assert 0 < short == long, gathered["collectives"]
    short, long = sharded["collectives"]
    assert long - short >= (NEW_TOKENS - NEW_TOKENS // 3) * config.num_hidden_layers, sharded["collectives"]
    assert gathered["sharded_after"]  # every module sharded again once the rollout is over
