"""Rollout pieces: layout-independent sampling, routing replay, prompt data, reward functions, stop strings."""

from __future__ import annotations

import json

import pytest
import torch

from polytrain.algorithms.logprobs import token_logprobs
from polytrain.data.chat import get_template, render
from polytrain.data.dataset import make_sample
from polytrain.data.packing import collate
from polytrain.data.prompts import load_prompts
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import ConfigError, DataError
from polytrain.models import build_model, preset
from polytrain.rollout.generate import SamplingConfig, generate, sample, sample_next
from polytrain.rollout.rewards import Rewards, exact_match, similarity
from polytrain.rollout.routing import RoutingRecorder, batch_routing, replayed, routers_of
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny"), "cpu", seed=0).eval()


PROMPTS = [[2, 5, 9, 11], [2, 7], [2, 8, 8, 8, 8, 3]]


def test_row_seeded_sampling_does_not_depend_on_the_batch(model):
    """Row i sampled alone, or in a batch with other rows in another order, draws the same tokens."""
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    together, _ = sample(model, PROMPTS, cfg, stop_ids={3}, row_seeds=[11, 12, 13])
    for i, prompt in enumerate(PROMPTS):
        alone, _ = sample(model, [prompt], cfg, stop_ids={3}, row_seeds=[11 + i])
        assert alone[0] == together[i]
    swapped, _ = sample(model, PROMPTS[::-1], cfg, stop_ids={3}, row_seeds=[13, 12, 11])
    assert swapped[::-1] == together
    other, _ = sample(model, PROMPTS, cfg, stop_ids={3}, row_seeds=[21, 22, 23])
    assert other != together  # the seeds matter


def test_per_row_inverse_cdf_sampling_has_the_right_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens = sample_next(probs.log().expand(4000, 3), SamplingConfig(temperature=1.0), gens)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    top_p = sample_next(probs.log().expand(4000, 3), SamplingConfig(temperature=1.0, top_p=0.5), gens)
    assert set(top_p.tolist()) == {1}  # the nucleus of mass 0.5 is the top token alone


def test_sample_keeps_stop_token_and_generate_drops_it(model):
    greedy = SamplingConfig(max_new_tokens=6)
    tokens, finished = sample(model, PROMPTS, greedy, stop_ids=set())
    assert all(len(t) == 6 for t in tokens) and not any(finished)
    stop = {tokens[0][2]}
    tokens2, finished2 = sample(model, PROMPTS[:1], greedy, stop_ids=stop)
    assert finished2 == [True] and tokens2[0] == tokens[0][: tokens[0].index(tokens[0][2]) + 1]
    assert generate(model, PROMPTS[:1], greedy, stop_ids=stop)[0] == tokens2[0][:-1]


def test_keep_going_runs_extra_steps_for_other_ranks(model):
    """A rank whose rows are all done keeps stepping while another rank still decodes (its rows stay done)."""
    greedy = SamplingConfig(max_new_tokens=6)
    first, _ = sample(model, PROMPTS[:1], greedy, stop_ids=set())
    stop = {first[0][0]}
    calls = []
    tokens, finished = sample(model, PROMPTS[:1], greedy, stop_ids=stop,
                              keep_going=lambda any_left: calls.append(any_left) or True)
    assert finished == [True] and tokens == [first[0][:1]]
    assert len(calls) == 5 and not any(calls)


def test_routing_replay_reproduces_sampling_routing_and_forcing_changes_it(model):
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0)
    recorder = RoutingRecorder(model)
    tokens, _ = sample(model, PROMPTS, cfg, stop_ids=set(), row_seeds=[1, 2, 3])
    per_sample = recorder.per_sample(PROMPTS, tokens)
    assert all(r.routing_record is None for r in routers_of(model))
    samples = [make_sample(p + t, [False] * len(p) + [True] * len(t), 64) for p, t in zip(PROMPTS, tokens)]
    batch = collate(samples, 64, packing=False)
    width = batch.input_ids.shape[1]
    for i, s in enumerate(per_sample):  # one [len(input), k] tensor per MoE layer
        assert all(layer.shape[0] == len(samples[i]) for layer in s)

    # the training forward picks the same experts as the cached sampling forward did
    check = RoutingRecorder(model)
    with torch.no_grad():
        plain = token_logprobs(model(batch.input_ids, position_ids=batch.position_ids), batch.labels)
    recorded = [r.routing_record[0].view(len(samples), width, -1) for r in check.routers]
    for router in check.routers:
        router.routing_record = None
    for layer, rec in enumerate(recorded):
        for i, s in enumerate(samples):
            assert torch.equal(rec[i, : len(s)], per_sample[i][layer])
    routing = batch_routing(per_sample, width)
    with torch.no_grad(), replayed(model, routing):
        replay = token_logprobs(model(batch.input_ids, position_ids=batch.position_ids), batch.labels)
    assert torch.equal(replay, plain)
    assert all(r.routing_override is None for r in routers_of(model))

    forced = [((e + 1) % preset("tiny").n_routed_experts, k) for e, k in routing]  # different experts
    with torch.no_grad(), replayed(model, forced):
        moved = token_logprobs(model(batch.input_ids, position_ids=batch.position_ids), batch.labels)
    assert not torch.allclose(moved, plain)


@pytest.fixture(scope="module")
def chat():
    tokenizer = Tokenizer.load(EXAMPLES / "tokenizer" / "tokenizer.json")
    return tokenizer, get_template("polytrain", tokenizer)


def test_prompt_records(chat, tmp_path):
    tokenizer, template = chat
    path = tmp_path / "p.jsonl"
    records = [
        {"prompt": "Reverse: ab", "answer": "ba"},
        {"messages": [{"role": "user", "content": "Uppercase: ab"}, {"role": "assistant", "content": "AB"}]},
        {"messages": [{"role": "user", "content": "Say twice: ab"}], "teacher": "math"},
        {"prompt": "Reverse: " + "x" * 200},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    items, dropped = load_prompts(path, tokenizer, template, max_prompt_len=40)
    assert dropped == 1
    assert [(p.text, p.answer, p.teacher) for p in items] == [
        ("Reverse: ab", "ba", None), ("Uppercase: ab", "AB", None), ("Say twice: ab", None, "math")]
    assert tokenizer.decode(items[1].ids, skip_special_tokens=False).endswith("<|assistant|>")
    # built on demand from the memory-mapped store: the ids the template renders, any text, slices with a step
    ids, _ = render([{"role": "user", "content": "Reverse: ab"}], template, tokenizer, add_generation_prompt=True)
    assert items[0].ids == ids and items[-1] == items[2] and items[::2] == [items[0], items[2]]
    path.write_text(json.dumps({"prompt": "Zählen: «ü»", "answer": "\"2\""}) + "\n")
    [unicode], _ = load_prompts(path, tokenizer, template, 40)
    assert (unicode.text, unicode.answer) == ("Zählen: «ü»", '"2"')
    path.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: expected an object with a `prompt` string"):
        load_prompts(path, tokenizer, template, 40)


def test_rewards_and_their_failures():
    assert exact_match(" 42 ", "42") == 1.0 and exact_match("41", "42") == 0.0 and exact_match("x", None) == 0.0
    assert similarity("abcd", "abcf") == pytest.approx(0.75)
    rewards = Rewards(["exact_match", "similarity"], [2.0, 1.0])
    assert rewards.score("abcd", "abcd", "p", True) == (3.0, [])
    bad = Rewards(["exact_match", "tests.unit.test_rollout:raising", "tests.unit.test_rollout:nan"], [])
    total, failures = bad.score("abcd", "abcd", "prompt text", True)
    assert total == 1.0
    assert [f.reward for f in failures] == ["tests.unit.test_rollout:raising", "tests.unit.test_rollout:nan"]
    assert "ZeroDivisionError" in failures[0].error and "nan" in failures[1].error
    assert failures[0].prompt == "prompt text" and failures[0].completion == "abcd"
    with pytest.raises(ConfigError, match="unknown reward `exact_matc`.*exact_match"):
        Rewards(["exact_matc"], [])


def raising(completion, answer, prompt, finished):
    return 1 / 0


def nan(completion, answer, prompt, finished):
    return float("nan")


def test_stop_strings_cut_the_completion_after_the_token_that_completes_them(chat):
    from types import SimpleNamespace

    from polytrain.objectives.rollout import RolloutObjective

    tokenizer, _ = chat
    objective = RolloutObjective.__new__(RolloutObjective)
    objective.ctx = SimpleNamespace(tokenizer=tokenizer)
    objective.stop_strings = lambda: ["xy"]
    tokens = tokenizer.encode("abxycd")
    cut, finished, text = objective._apply_stop_strings(tokens, False, "abxycd")
    assert tokenizer.decode(cut) == "abxy" and finished and text == "ab"
    assert objective._apply_stop_strings(tokens[:3], False, "abx") == (tokens[:3], False, "abx")


def test_each_prompt_is_scored_by_its_named_teacher_else_by_the_mean(chat):
    import contextlib
    from types import SimpleNamespace

    import torch.nn.functional as F

    from polytrain.algorithms.distill import mean_teacher_logprobs
    from polytrain.objectives.distill import DistillObjective

    torch.manual_seed(0)
    logits = {"math": torch.randn(2, 3, 5), "code": torch.randn(2, 3, 5)}
    objective = DistillObjective.__new__(DistillObjective)
    objective.teachers = {name: (lambda ids, position_ids, x=x: x) for name, x in logits.items()}
    objective.ctx = SimpleNamespace(autocast=contextlib.nullcontext)
    batch = SimpleNamespace(input_ids=torch.zeros(2, 3, dtype=torch.long), position_ids=None)
    rollouts = [SimpleNamespace(prompt=SimpleNamespace(teacher="code")), SimpleNamespace(prompt=SimpleNamespace(
        teacher=None))]
    got = objective.teacher_logprobs(rollouts, batch)
    logp = {name: F.log_softmax(x, dim=-1) for name, x in logits.items()}
    assert torch.allclose(got[0], logp["code"][0])
    assert torch.allclose(got[1], mean_teacher_logprobs(list(logp.values()))[1])
    rollouts[0].prompt.teacher = None
    assert torch.allclose(objective.teacher_logprobs(rollouts, batch), mean_teacher_logprobs(list(logp.values())))
