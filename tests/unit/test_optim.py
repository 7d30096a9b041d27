"""Learning-rate schedule and parameter groups."""

from __future__ import annotations

import itertools
import math

from polytrain.config import TrainConfig
from polytrain.models import build_model, preset
from polytrain.train.optim import build_optimizer, lr_at


def test_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == 0.1 and lr_at(10, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.55)  # half way through the decay
    assert math.isclose(lr_at(110, cfg), 0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_no_weight_decay_on_norms():
    model = build_model(preset("tiny"), "cpu")
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
