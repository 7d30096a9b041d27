"""Rollouts on a few ranks for all of them (`grpo.rollout_ranks`, objectives/placement.py), 4 gloo ranks
(dp_shard 2 x tp 2) with an external engine (tests/e2e/fake_engine.py) on ranks 1 and 2 only:

- only the rollout ranks construct an engine and receive weights;
- every rank gets the completions of its own prompts, the same tokens (and log-probs within 1e-5) as the policy
  itself samples on that rank with the same row seeds: placement changes who samples, not what;
- after two GRPO steps each host's engine holds exactly the trained policy's weights, every sync passed the probe
  check, and the final checkpoint holds them too;
- a failure on one rank (an engine that dies) stops every rank with its message instead of leaving the others
  waiting in a collective."""

from __future__ import annotations

import importlib
import json
import sys

import torch

from tests.conftest import ROOT
from tests.e2e.test_cli import final_weights

sys.path.insert(0, str(ROOT / "benchmarks"))
startup_memory = importlib.import_module("startup_memory")

SCRIPT = """
import json, os, sys, torch
os.environ["FAKE_ENGINE_OUT"] = os.path.join(sys.argv[2], "engine-rank" + os.environ["RANK"] + ".pt")
from polytrain.config import build_config
from polytrain.rollout.engine import BuiltinEngine
from polytrain.train.trainer import Trainer

trainer = Trainer(build_config(json.loads(sys.argv[1])), overwrite=True)
objective, c = trainer.objective, trainer.objective.ctx.collectives
placed = objective.engine
prompts = list(objective.train_items[:4])
share = len(prompts) // c.dp_size
mine = prompts[c.dp_rank * share : (c.dp_rank + 1) * share]
objective.sync_weights()  # what the first rollout does first
objective.engine_stale = False
sampled = objective.sample_completions(mine, 3, c.dp_rank * share)
objective.engine = BuiltinEngine(trainer.model, lambda: c.decoding(trainer.model, "gathered"))
own = objective.sample_completions(mine, 3, c.dp_rank * share)
objective.engine = placed
hosts, dp_rank = placed.local is not None, c.dp_rank
trainer.run()
report = {"hosts": hosts, "updates": placed.local.updates if hosts else 0, "dp_rank": dp_rank,
          "generated": placed.local.generated if hosts else [],
          "tokens": [x.tokens for _, x in sampled], "own_tokens": [x.tokens for _, x in own],
          "logprobs": [x.logprobs for _, x in sampled], "own_logprobs": [x.logprobs for _, x in own]}
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(report, handle)
from polytrain.parallel.runtime import exit_process
exit_process(0)  # not through the interpreter's shutdown (see there)
"""


def test_rollout_ranks_sample_for_every_rank_and_alone_receive_the_weights(tmp_path):
    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.hf import save_hf

    config = model_config_from_table({"preset": "tiny-v3", "num_nextn_predict_layers": 0})
    save_hf(build_model(config, "cpu", seed=5), tmp_path / "hf", dtype=torch.float32)
    spec = startup_memory.job(tmp_path / "hf", tmp_path / "run",
                              {"dp_shard": 2, "tp": 2, "sequence_parallel": False})
    spec["run"]["algorithm"] = "grpo"
    spec["data"]["train_path"] = str(ROOT / "examples" / "data" / "count_train.jsonl")
    spec["train"].update(global_batch_size=4, micro_batch_size=2, steps=2)
    spec["grpo"] = {"engine": "tests.e2e.fake_engine:FakeEngine", "rollout_ranks": [1, 2], "group_size": 2,
                    "max_new_tokens": 8, "sync_bucket_mb": 1}
    spec["model"] = {}
    startup_memory.launch(4, ["-c", SCRIPT, json.dumps(spec), str(tmp_path)])
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]

    assert [r["hosts"] for r in reports] == [False, True, True, False]
    assert [r["updates"] for r in reports] == [0, 3, 3, 0]  # the starting weights, then after each step
    # each host samples one data-parallel group's 2 prompts x 2 once per rollout (its two tensor-parallel ranks
    # share the request): the call above, then the two steps' rollouts
    assert reports[1]["generated"] == reports[2]["generated"] == [4, 4, 4]
    # every sync was checked on the probe batch (the hosts' engines against the trainer), and a forward without a
    # backward before the optimizer was built or after the last step left no rank's parameters unsharded: the run
    # trained every parameter and saved its final checkpoint
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checked = [r for r in rows if "sync_gap_mean" in r]
    assert len(checked) == 2 and all(r["sync_gap_mean"] < 1e-5 for r in checked), checked
    trained = final_weights(tmp_path / "run")
    for rank in (1, 2):
        held = torch.load(tmp_path / f"engine-rank{rank}.pt", weights_only=True)["state"]
        assert all(torch.equal(held[name], tensor) for name, tensor in trained.items())
    assert sorted(r["dp_rank"] for r in reports) == [0, 0, 1, 1]
    for r in reports:
        assert len(r["tokens"]) == 4 and r["tokens"] == r["own_tokens"]
        for ours, theirs in zip(r["logprobs"], r["own_logprobs"]):
            assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)
    assert reports[0]["tokens"] != next(r for r in reports if r["dp_rank"] != reports[0]["dp_rank"])["tokens"]


TOGETHER = """
import json, os, sys
import torch.distributed as dist
from polytrain.objectives.placement import together

class Ranks:
    rank = int(os.environ["RANK"])
    def all_gather_objects(self, obj):
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

dist.init_process_group("gloo")
def work():
    raise RuntimeError("server gone")
try:
    together(Ranks(), work if Ranks.rank == 1 else None, "sampling")
    outcome = "returned"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
dist.barrier()  # both ranks are here: neither waits for the other
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".txt"), "w") as handle:
    handle.write(outcome)
dist.destroy_process_group()
"""


def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    startup_memory.launch(2, ["-c", TOGETHER, str(tmp_path)], timeout=120)
    assert (tmp_path / "rank1.txt").read_text() == "RuntimeError: server gone"
    assert (tmp_path / "rank0.txt").read_text() == "PolytrainError: sampling on rank 1: RuntimeError: server gone"
