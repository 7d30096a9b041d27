"""Preference pairs: plain-text and messages forms, and the bad records a user gets one clear line for."""

from __future__ import annotations

import json

import pytest

from polytrain.data.chat import get_template
from polytrain.data.preference import load_preference_pairs
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError
from tests.conftest import TOKENIZER


@pytest.fixture(scope="module")
def chat():
    tokenizer = Tokenizer.load(TOKENIZER)
    return tokenizer, get_template("polytrain", tokenizer)


def write(tmp_path, records):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_and_message_forms_give_the_same_samples(chat, tmp_path):
    tokenizer, template = chat
    text = {"prompt": "Reverse: ab", "chosen": "ba", "rejected": "ab", "margin": 1.5}
    messages = {"prompt": [{"role": "user", "content": "Reverse: ab"}],
                "chosen": [{"role": "assistant", "content": "ba"}],
                "rejected": [{"role": "assistant", "content": "ab"}],
                "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}
    pairs, dropped = load_preference_pairs(write(tmp_path, [text, messages]), tokenizer, template, 64, 1000)
    assert dropped == 0
    assert pairs[0].chosen.input_ids.tolist() == pairs[1].chosen.input_ids.tolist()
    assert pairs[0].rejected.labels.tolist() == pairs[1].rejected.labels.tolist()
    assert pairs[0].chosen.input_ids.tolist() != pairs[0].rejected.input_ids.tolist()
    assert (pairs[0].margin, pairs[0].ref_chosen) == (1.5, None)
    assert (pairs[1].ref_chosen, pairs[1].ref_rejected) == (-1.0, -2.0)


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Reverse: ab", "chosen": "ba", "rejected": "ba"},
     "pairs.jsonl:2: `chosen` and `rejected` are identical"),
    ({"prompt": "Reverse: ab", "chosen": "ba"}, "pairs.jsonl:2: a preference pair needs `prompt`, `chosen` and "
     "`rejected` (found keys: prompt, chosen)"),
    ({"prompt": "x", "chosen": 3, "rejected": "y"}, "pairs.jsonl:2: chosen: expected a string or a list of messages"),
])
def test_bad_pairs_name_file_and_line(chat, tmp_path, record, message):
    tokenizer, template = chat
    good = {"prompt": "Reverse: ab", "chosen": "ba", "rejected": "ab"}
    with pytest.raises(DataError) as err:
        load_preference_pairs(write(tmp_path, [good, record]), tokenizer, template, 64, 1000)
    assert message in str(err.value)


def test_pairs_too_long_are_dropped_and_counted(chat, tmp_path):
    tokenizer, template = chat
    records = [{"prompt": "Reverse: ab", "chosen": "ba", "rejected": "ab"},
               {"prompt": "Reverse: " + "x" * 100, "chosen": "x", "rejected": "y"}]
    pairs, dropped = load_preference_pairs(write(tmp_path, records), tokenizer, template, 32, 1000)
    assert (len(pairs), dropped) == (1, 1)
