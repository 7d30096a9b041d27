"""Parallel layouts are validated against the world size and the model before any process group starts."""

from __future__ import annotations

import pytest

from polytrain.errors import ConfigError
from polytrain.models import preset
from polytrain.parallel.config import ParallelConfig
from polytrain.parallel.mesh import ParallelDims
from polytrain.parallel.pp import split_layers, stages_of_rank


def resolve(world: int, model: str = "tiny", **degrees):
    return ParallelDims.resolve(ParallelConfig(**degrees), world, preset(model))


def test_dp_shard_fills_the_rest_of_the_world():
    dims = resolve(8, tp=2, pp=2)
    assert (dims.dp_shard, dims.dp, dims.efsdp) == (2, 2, 2)
    assert resolve(8, ep=4).efsdp == 2


@pytest.mark.parametrize(
    ("world", "degrees", "message"),
    [
        (6, {"tp": 4}, "world size 6 is not divisible by dp_replicate x cp x tp x pp = 1 x 1 x 4 x 1 = 4"),
        (4, {"dp_shard": 3}, "1 x 3 x 1 x 1 x 1 = 3, but 4 processes are running; valid layouts include: dp_shard=4"),
        (6, {"cp": 4}, "world size 6 is not divisible by dp_replicate x cp x tp x pp = 1 x 4 x 1 x 1 = 4"),
        (8, {"cp": 2, "ep": 8}, None),  # the experts spread over dp_shard x cp = 8 ranks
        (4, {"cp": 2, "pp": 2}, None),
        (2, {"cp": 2, "model": "tiny-v4"}, None),
        (4, {"ep": 3}, "parallel.ep = 3 must divide the 4 ranks the routed experts are spread over"),
        (4, {"ep": 4, "model": "tiny-v3"}, None),
        (16, {"ep": 16}, "parallel.ep = 16 must divide model.n_routed_experts = 8"),
        (6, {"tp": 3}, "parallel.tp = 3 must divide model.num_attention_heads = 4"),
        (8, {"pp": 8}, "parallel.pp = 8 exceeds model.num_hidden_layers = 4"),
        (2, {"tp": 2, "model": "tiny-v4"}, None),
        (2, {"tp": 2, "sequence_parallel": False, "model": "tiny-v4"}, None),
        (4, {"tp": 4, "sequence_parallel": False, "model": "tiny-v4"},
         "parallel.tp = 4 must divide model.o_groups = 2"),
    ],
)
def test_bad_layouts_name_the_numbers(world, degrees, message):
    model = degrees.pop("model", "tiny")
    if message is None:
        resolve(world, model, **degrees)
        return
    with pytest.raises(ConfigError) as err:
        resolve(world, model, **degrees)
    assert message in str(err.value)


def test_context_parallel_ranks_hold_tokens_and_shard_parameters_like_data_parallel_ones():
    dims = resolve(8, cp=2, ep=4)
    assert (dims.dp_shard, dims.dp, dims.token_ranks, dims.efsdp) == (4, 4, 8, 2)


def test_context_parallel_is_refused_for_objectives_whose_sums_are_not_over_tokens(tmp_path):
    from polytrain.config import build_config
    from polytrain.objectives import registry
    from polytrain.train.trainer import check_job

    config = build_config({"data": {"train_path": "x", "tokenizer": "y"}, "parallel": {"cp": 2},
                           "run": {"algorithm": "rm"}})
    with pytest.raises(ConfigError, match="parallel.cp > 1 is not supported for rm yet"):
        check_job(registry.objective_class("rm"), config, resolve(2, cp=2))


def test_layer_split_even_or_with_a_chosen_first_stage():
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(8, 3, first_stage_layers=2) == [range(0, 2), range(2, 5), range(5, 8)]
    with pytest.raises(ConfigError, match="leaves no layer"):
        split_layers(4, 3, first_stage_layers=3)


def test_v_schedules_put_first_and_last_stage_on_rank_zero():
    assert stages_of_rank(0, 4, "zbv") == [0, 7]
    assert stages_of_rank(1, 4, "interleaved_1f1b") == [1, 5]
    assert stages_of_rank(2, 4, "1f1b") == [2]


@pytest.mark.parametrize(("algorithm", "extra", "refused"), [
    ("grpo", {}, True), ("grpo", {"grpo": {"engine": "vllm"}}, False), ("distill", {}, True), ("sft", {}, False),
    ("grpo", {"grpo": {"engine": "vllm"}, "eval_path": "e"}, True)])  # evaluation samples with the built-in engine
def test_sequence_parallelism_is_refused_where_the_built_in_engine_decodes(algorithm, extra, refused):
    """Cached decoding runs one token per forward: it cannot be split by sequence position over tp ranks."""
    from polytrain.config import build_config
    from polytrain.objectives import registry
    from polytrain.train.trainer import check_job

    data = {"train_path": "x", "tokenizer": "y", "eval_path": extra.get("eval_path", "")}
    sections = {k: v for k, v in extra.items() if k != "eval_path"}
    config = build_config({"data": data, "parallel": {"tp": 2},
                           "run": {"algorithm": algorithm}, "train": {"global_batch_size": 16, "micro_batch_size": 1},
                           **sections})
    objective, dims = registry.objective_class(algorithm), resolve(2, tp=2)
    if not refused:
        check_job(objective, config, dims)
        return
    with pytest.raises(ConfigError, match="cannot be split by sequence position over parallel.tp = 2 ranks: set "
                                          "parallel.sequence_parallel = false"):
        check_job(objective, config, dims)
    config.parallel.sequence_parallel = False
    check_job(objective, config, dims)
