"""PlacedEngine (objectives/placement.py) in one process: an engine that fails, or answers fewer completions than
asked, is an error (that every rank raises: tests/distributed/test_rollout_placement.py), and the host's weight dtype
and probe ability are what every rank uses."""

from __future__ import annotations

import pytest
import torch

from polytrain.errors import PolytrainError
from polytrain.objectives.placement import PlacedEngine
from polytrain.rollout.generate import SamplingConfig


class OneRank:
    rank, world_size, dp_rank, dp_size = 0, 1, 0, 1

    def all_gather_objects(self, obj):
        return [obj]

    def scatter_objects(self, objs, src):
        return objs[0]

    def broadcast_object(self, obj, src):
        return obj


class Broken:
    weight_dtype = torch.float16

    def generate(self, prompts, sampling, stop_ids, record_routing=False, row_seeds=None):
        raise RuntimeError("engine died")

    def update_weights(self, buckets):
        pass


class Short(Broken):
    def generate(self, prompts, sampling, stop_ids, record_routing=False, row_seeds=None):
        return []


def test_the_rollout_ranks_engine_failing_or_answering_short_is_an_error():
    engine = PlacedEngine(Broken(), [0], OneRank())
    assert engine.weight_dtype == torch.float16 and engine.receives_weights
    assert not engine.probes and not engine.restarts
    with pytest.raises(RuntimeError, match="engine died"):  # the failed rank: its own error (the others: below)
        engine.generate([[1, 2]], SamplingConfig(4, 1.0), set(), row_seeds=[7])
    with pytest.raises(PolytrainError, match="the engine returned 0 completions for 1 prompts"):
        PlacedEngine(Short(), [0], OneRank()).generate([[1, 2]], SamplingConfig(4, 1.0), set(), row_seeds=[7])
