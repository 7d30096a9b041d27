"""The tokenizer files of an export: transformers' `AutoTokenizer` loads them and `apply_chat_template` (each built-in
template's Jinja form, a Jinja template as shipped) gives the text and the token ids `render` gives."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from polytrain.data.chat import TEMPLATES, get_template, render
from polytrain.data.tokenizer import Tokenizer
from polytrain.train.export_tokenizer import ExportTokenizer
from tests.conftest import EXAMPLES, TOKENIZER

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say twice: abc"},
        {"role": "assistant", "content": "abc abc"}, {"role": "user", "content": "Reverse: xyz"}]


def tokenizer_for(tmp_path, name: str) -> str:
    """The example tokenizer plus the special tokens of template `name`."""
    tok = HFTokenizer.from_file(str(TOKENIZER))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TEMPLATES[name].special_tokens])
    path = tmp_path / f"{name}.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_apply_chat_template_on_the_export_gives_the_ids_render_gives(tmp_path, name):
    from transformers import AutoTokenizer

    path = tokenizer_for(tmp_path, name)
    ExportTokenizer(path, name).write(tmp_path, 512, language_model=True)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.load(path)
    template = get_template(name, ours)
    for messages, prompt in ((CHAT[:3], False), (CHAT, True)):
        ids, _ = render(messages, template, ours, add_generation_prompt=prompt)
        text = template.bos + "".join(template.prefix[m["role"]] + m["content"] + template.suffix[m["role"]]
                                      for m in messages) + (template.prefix["assistant"] if prompt else "")
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
        got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
        assert got == ids, (got, ids)
    assert hf.eos_token == template.stop[0] and hf.bos_token == (template.bos or None)
    assert hf.pad_token == "<|pad|>" and hf.pad_token_id == 0
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    stops = [ours.token_id(t) for t in template.stop]
    assert generation["eos_token_id"] == (stops[0] if len(stops) == 1 else stops)


def test_a_jinja_template_is_written_as_it_was_shipped(tmp_path):
    shipped = EXAMPLES / "tokenizer" / "chat_template.jinja"
    ExportTokenizer(str(TOKENIZER), str(shipped)).write(tmp_path, 512, language_model=True)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["chat_template"] == shipped.read_text()
    assert written["eos_token"] == "<|end|>"


def test_padding_never_closes_a_turn(tmp_path):
    """Without a token named like padding, id 0 pads, unless a conversation can end on it."""
    from tokenizers.models import WordLevel

    specials = ["<|end|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>"]
    for first, pad in (("<|end|>", None), ("<|unk|>", "<|unk|>")):
        order = [first] + [t for t in [*specials, "<|unk|>"] if t != first]
        tok = HFTokenizer(WordLevel({t: i for i, t in enumerate(order)}, unk_token="<|unk|>"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.save(str(tmp_path / "tokenizer.json"))
        special = ExportTokenizer(str(tmp_path), "polytrain").special
        assert special.pad == pad and special.ids["eos_token_id"] == order.index("<|end|>")
