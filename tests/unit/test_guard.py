"""The guard: non-finite values and loss spikes become events; too many in a row stop the run."""

from __future__ import annotations

import json
import math

import pytest

from polytrain.config import GuardConfig
from polytrain.train.guard import Guard, GuardStop


def test_nonfinite_loss_and_gradient_are_events():
    guard = Guard(GuardConfig(), None)
    assert guard.check(1, 2.0, 1.0) is None
    assert guard.check(2, math.nan, 1.0).kind == "nonfinite_loss"
    assert guard.check(3, 2.0, math.inf).kind == "nonfinite_grad"


def test_spike_needs_history_and_uses_the_zscore():
    guard = Guard(GuardConfig(spike_zscore=4.0, spike_min_history=5, spike_window=10), None)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95], start=1):
        assert guard.check(step, loss, 1.0) is None
    assert guard.check(6, 2.1, 1.0) is None  # normal noise
    event = guard.check(7, 9.0, 1.0)
    assert event.kind == "loss_spike" and "z-score" in event.detail
    early = Guard(GuardConfig(spike_min_history=5), None)
    assert early.check(1, 2.0, 1.0) is None and early.check(2, 50.0, 1.0) is None  # too little history


def test_events_are_logged_and_too_many_in_a_row_stop(tmp_path):
    events = tmp_path / "events.jsonl"
    guard = Guard(GuardConfig(max_consecutive=2), events)
    for step in (1, 2):
        guard.record(guard.check(step, math.nan, 1.0), write=True)
    with pytest.raises(GuardStop, match="3 event\\(s\\) in a row, limit 2"):
        guard.record(guard.check(3, math.nan, 1.0), write=True)
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["loss"] == "nan"


def test_a_good_step_resets_the_run_of_events_and_state_round_trips():
    guard = Guard(GuardConfig(max_consecutive=1), None)
    guard.record(guard.check(1, math.nan, 1.0), write=False)
    assert guard.check(2, 1.0, 1.0) is None
    guard.record(guard.check(3, math.nan, 1.0), write=False)  # not a second in a row: allowed
    again = Guard(GuardConfig(), None)
    again.load_state_dict(guard.state_dict())
    assert again.total == 2 and list(again.history) == [1.0]
