"""The sample order: deterministic, a permutation per epoch, resumable from a global sample index."""

from __future__ import annotations

import functools
import operator

from polytrain.data.loader import SampleOrder, StepLoader


def test_same_seed_same_order_different_seed_different_order():
    assert SampleOrder(50, seed=3).indices(0, 50) == SampleOrder(50, seed=3).indices(0, 50)
    assert SampleOrder(50, seed=3).indices(0, 50) != SampleOrder(50, seed=4).indices(0, 50)


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    order = SampleOrder(20, seed=0)
    first, second = order.indices(0, 20), order.indices(20, 20)
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second


def test_no_shuffle_is_dataset_order():
    assert SampleOrder(5, seed=9, shuffle=False).indices(3, 4) == [3, 4, 0, 1]


def test_resume_continues_exactly_where_it_stopped():
    straight = StepLoader(37, global_batch_size=8, seed=5)
    reference = [straight.next_step() for _ in range(10)]

    first = StepLoader(37, global_batch_size=8, seed=5)
    got = [first.next_step() for _ in range(4)]
    state = first.state_dict()
    assert state["position"] == 32

    resumed = StepLoader(37, global_batch_size=8, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_step() for _ in range(6)]
    assert got == reference


def test_position_is_independent_of_how_a_step_is_split():
    """The global batch is the same samples whether one rank or four consume it."""
    loader = StepLoader(100, global_batch_size=16, seed=1)
    step = loader.next_step()
    per_rank = [step[r * 4 : (r + 1) * 4] for r in range(4)]
    assert functools.reduce(operator.iadd, per_rank, []) == step
    assert loader.position == 16
