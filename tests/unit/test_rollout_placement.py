"""PlacedEngine (objectives/placement.py) in one process: an engine failure on a rollout rank stops every rank with
its message (no rank waits for answers that never come), and the host's weight dtype and probe ability are what
every rank uses."""

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


def test_an_engine_failure_on_a_rollout_rank_is_raised_on_every_rank():
    engine = PlacedEngine(Broken(), [0], OneRank())
    assert engine.weight_dtype == torch.float16 and engine.receives_weights
    assert not engine.probes and not engine.restarts
    with pytest.raises(PolytrainError, match="rollout rank 0: RuntimeError: engine died"):
        engine.generate([[1, 2]], SamplingConfig(4, 1.0), set(), row_seeds=[7])
