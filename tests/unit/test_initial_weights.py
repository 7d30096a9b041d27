"""Starting weights are read by every rank for its own shards, so a missing or damaged tensor can fail on some
ranks only: every rank must then stop with an error instead of the others waiting in the next collective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polytrain.errors import CheckpointError
from polytrain.models import build_model, preset
from polytrain.train.init_weights import load_initial_weights


def test_a_rank_that_fails_to_load_tells_the_others_and_they_stop_too(tmp_path):
    model = build_model(preset("tiny"), "cpu", seed=None)
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    verdicts = []

    def failing_rank(ok):
        verdicts.append(ok)
        return False

    with pytest.raises(CheckpointError):
        load_initial_weights(SimpleNamespace(hf_path=str(tmp_path), from_run=""), model, agree=failing_rank)
    assert verdicts == [False]

    no_init = SimpleNamespace(hf_path="", from_run="")
    with pytest.raises(CheckpointError, match="failed on another rank"):
        load_initial_weights(no_init, model, agree=lambda ok: False)
    assert load_initial_weights(no_init, model, agree=lambda ok: ok) == ""
