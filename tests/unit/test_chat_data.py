"""Chat rendering, the assistant-only loss mask, and clear errors for bad conversation files."""

from __future__ import annotations

import json

import pytest

from polytrain.data.chat import get_template, render
from polytrain.data.dataset import IGNORE, load_sft_dataset
from polytrain.data.jsonl import load_conversations
from polytrain.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Ok"},
]


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_assistant_only_mask_covers_exactly_assistant_content_and_turn_end(tokenizer):
    template = get_template("polytrain", tokenizer)
    ids, mask = render(CONVERSATION, template, tokenizer)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "Yo<|end|>Ok<|end|>"
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Yo<|end|>"
                    "<|user|>Again<|end|><|assistant|>Ok<|end|>")


def test_loss_on_all_trains_every_token(tokenizer):
    template = get_template("polytrain", tokenizer)
    _, mask = render(CONVERSATION, template, tokenizer, loss_on="all")
    assert all(mask)


def test_generation_prompt_ends_with_assistant_prefix(tokenizer):
    template = get_template("polytrain", tokenizer)
    ids, _ = render(CONVERSATION[:2], template, tokenizer, add_generation_prompt=True)
    assert tokenizer.decode(ids[-1:], skip_special_tokens=False) == "<|assistant|>"


def test_labels_are_next_tokens_on_trained_positions_only(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"messages": CONVERSATION})])
    dataset = load_sft_dataset(str(path), tokenizer, get_template("polytrain", tokenizer), 512, "assistant", 128)
    sample = dataset.samples[0]
    ids, mask = render(CONVERSATION, get_template("polytrain", tokenizer), tokenizer)
    assert sample.input_ids.tolist() == ids[:-1]
    for pos, label in enumerate(sample.labels.tolist()):
        assert label == (ids[pos + 1] if mask[pos + 1] else IGNORE)


def test_truncation_is_counted_and_empty_results_dropped(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]}
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write(tmp_path, [json.dumps(long), json.dumps(short)])
    dataset = load_sft_dataset(str(path), tokenizer, get_template("polytrain", tokenizer), 20, "assistant", 128)
    assert (dataset.truncated, dataset.dropped, len(dataset)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps({"messages": CONVERSATION}), "{not json"], "data.jsonl:2: invalid JSON"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "data.jsonl:1: conversation has no assistant turn"),
        (['{"msgs": []}'], "data.jsonl:1: expected an object with a `messages` list (found keys: msgs)"),
        (['{"messages": [{"role": "asistant", "content": "x"}]}'], "did you mean `assistant`?"),
        (['{"messages": [{"role": "user", "content": 3}]}'], "messages[0].content must be a string"),
        (["", "  "], "dataset is empty"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path, lines)
    with pytest.raises(DataError, match="data.jsonl") as err:
        load_conversations(path)
    assert message in str(err.value)


def test_missing_file_and_wrong_template(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        load_conversations(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="needs the special tokens"):
        get_template("deepseek", tokenizer)
    with pytest.raises(DataError, match="did you mean `chatml`"):
        get_template("chatm", tokenizer)


def test_token_ids_beyond_model_vocab_are_rejected(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"messages": CONVERSATION})])
    with pytest.raises(DataError, match="model.vocab_size"):
        load_sft_dataset(str(path), tokenizer, get_template("polytrain", tokenizer), 512, "assistant", 50)
