"""A model's own Jinja chat template: the text equals transformers' rendering, the loss mask covers exactly the
assistant spans, the released DeepSeek-V3 / R1 templates work as they are, and bad templates fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from polytrain.config import build_config
from polytrain.data.chat import get_template, render, stop_token_ids
from polytrain.data.jinja_template import JinjaTemplate
from polytrain.data.jsonl import load_conversations
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import ConfigError, DataError
from tests.conftest import EXAMPLES, ROOT, TOKENIZER
from tests.unit.test_chat_data import CONVERSATION

ASSETS = ROOT / "tests" / "assets" / "chat_templates"
DEEPSEEK_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")



def make_tokenizer(directory: Path, specials: list[str], config: dict | None = None) -> Tokenizer:
    """A character-level tokenizer.json (printable ASCII and newline) with `specials` as special tokens, and
    optionally a tokenizer_config.json, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(["<unk>", *specials, *chars])}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return Tokenizer.load(directory)


def released(name: str, tmp_path: Path) -> Tokenizer:
    """A tokenizer directory with DeepSeek's special tokens and the released tokenizer_config.json `name`."""
    directory = tmp_path / name
    make_tokenizer(directory, DEEPSEEK_TOKENS)
    shutil.copy(ASSETS / name / "tokenizer_config.json", directory / "tokenizer_config.json")
    return Tokenizer.load(directory)


def chatml(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path / "chatml", CHATML_TOKENS, {"eos_token": "<|endoftext|>", "chat_template": CHATML})


def trained_runs(ids: list[int], mask: list[bool], tokenizer: Tokenizer) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs: list[list[int]] = []
    for i, (token, trained) in enumerate(zip(ids, mask)):
        if trained:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def hf_render(tokenizer: Tokenizer, messages: list[dict[str, str]], **kwargs):
    """What transformers' apply_chat_template makes of the same tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(Path(tokenizer.path).parent))
    return hf.apply_chat_template(messages, return_dict=False, **kwargs)


THINKING = [*CONVERSATION[:4], {"role": "assistant", "content": "<think>\nplan\n</think>\n\nOk"}]


@pytest.mark.parametrize(
    ("name", "messages", "runs"),
    [
        ("deepseek_v3", CONVERSATION, ["Yo<｜end▁of▁sentence｜>", "Ok<｜end▁of▁sentence｜>"]),
        ("deepseek_r1", CONVERSATION, ["Yo<｜end▁of▁sentence｜>", "Ok<｜end▁of▁sentence｜>"]),
        # R1's released template drops everything up to `</think>` from every assistant message it writes.
        ("deepseek_r1", THINKING, ["Yo<｜end▁of▁sentence｜>", "\n\nOk<｜end▁of▁sentence｜>"]),
    ],
)
def test_released_deepseek_templates_mask_exactly_the_assistant_spans(tmp_path, name, messages, runs):
    tokenizer = released(name, tmp_path)
    template = get_template("tokenizer", tokenizer)
    ids, mask = render(messages, template, tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=False) == hf_render(tokenizer, messages, tokenize=False)
    assert ids == hf_render(tokenizer, messages, tokenize=True)
    assert trained_runs(ids, mask, tokenizer) == runs
    assert stop_token_ids(template, tokenizer) == {tokenizer.token_id("<｜end▁of▁sentence｜>")}


def test_deepseek_v3_template_tokenises_like_the_builtin_deepseek_template(tmp_path):
    tokenizer = released("deepseek_v3", tmp_path)
    jinja = get_template("tokenizer", tokenizer)
    builtin = get_template("deepseek", tokenizer)
    for loss_on in ("assistant", "all"):
        assert render(CONVERSATION, jinja, tokenizer, loss_on) == render(CONVERSATION, builtin, tokenizer, loss_on)


def test_chatml_template_masks_match_rendered_spans_and_the_builtin_chatml(tmp_path):
    tokenizer = chatml(tmp_path)
    template = get_template("tokenizer", tokenizer)
    ids, mask = render(CONVERSATION, template, tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=False) == hf_render(tokenizer, CONVERSATION, tokenize=False)
    assert trained_runs(ids, mask, tokenizer) == ["Yo<|im_end|>\n", "Ok<|im_end|>\n"]
    assert (ids, mask) == render(CONVERSATION, get_template("chatml", tokenizer), tokenizer)
    assert all(render(CONVERSATION, template, tokenizer, "all")[1])
    # eos_token is <|endoftext|>; the token that closes a turn is found from the template itself
    assert template.stop == ("<|endoftext|>", "<|im_end|>")


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_r1", "chatml"])
def test_generation_prompt_equals_transformers(tmp_path, name):
    tokenizer = chatml(tmp_path) if name == "chatml" else released(name, tmp_path)
    template = get_template("tokenizer", tokenizer)
    prompt = CONVERSATION[:4]
    ids, mask = render(prompt, template, tokenizer, add_generation_prompt=True)
    assert template.text(prompt, add_generation_prompt=True) == hf_render(
        tokenizer, prompt, tokenize=False, add_generation_prompt=True)
    assert ids == hf_render(tokenizer, prompt, tokenize=True, add_generation_prompt=True)
    assert len(trained_runs(ids, mask, tokenizer)) == 1  # the earlier reply; the opening of the new one is not trained
    if name == "deepseek_r1":
        assert template.text(prompt, add_generation_prompt=True).endswith("<｜Assistant｜><think>\n")


def test_jinja_environment_matches_transformers(tmp_path):
    """Whitespace control, namespaces, loop controls, tojson (non-ASCII kept), generation tags, special tokens."""
    source = (
        "{{ bos_token }}\n"
        "{%- set ns = namespace(n=0) %}\n"
        "{%- for m in messages %}\n"
        "    {%- if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {%- set ns.n = ns.n + 1 %}\n"
        "<|im_start|>{{ m.role }} {{ ns.n }} {{ {'text': m.content, 'n': ns.n} | tojson }}\n"
        "    {% if m.role == 'assistant' %}\n"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
        "    {% else %}\n"
        "{{ m.content }}<|im_end|>\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}\n"
    )
    tokenizer = make_tokenizer(tmp_path / "t", CHATML_TOKENS, {"bos_token": "<|endoftext|>", "chat_template": source})
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "héllo \"x\""}, CONVERSATION[3]]
    template = get_template("tokenizer", tokenizer)
    for generation in (False, True):
        expected = hf_render(tokenizer, messages, tokenize=False, add_generation_prompt=generation)
        assert template.text(messages, generation) == expected


def test_example_jinja_template_renders_like_the_builtin_polytrain_template(tokenizer):
    jinja = get_template("tokenizer", tokenizer)  # examples/tokenizer/chat_template.jinja
    builtin = get_template("polytrain", tokenizer)
    assert isinstance(jinja, JinjaTemplate) and "<|end|>" in jinja.stop
    for conversation in load_conversations(EXAMPLES / "data" / "train.jsonl")[:100]:
        assert render(conversation, jinja, tokenizer) == render(conversation, builtin, tokenizer)
        prompt = conversation[:-1]
        assert render(prompt, jinja, tokenizer, add_generation_prompt=True) == render(
            prompt, builtin, tokenizer, add_generation_prompt=True)


def test_template_from_a_jinja_file_or_a_tokenizer_config_path(tmp_path):
    tokenizer = released("deepseek_v3", tmp_path)
    config = ASSETS / "deepseek_r1" / "tokenizer_config.json"
    from_config = get_template(str(config), tokenizer)
    jinja_file = tmp_path / "r1.jinja"
    jinja_file.write_text(json.loads(config.read_text(encoding="utf-8"))["chat_template"], encoding="utf-8")
    from_file = get_template(str(jinja_file), tokenizer)  # special tokens come from the tokenizer's directory
    assert from_file == from_config != get_template("tokenizer", tokenizer)
    assert from_file.jinja_source.endswith("{{'<｜Assistant｜><think>\\n'}}{% endif %}")


def test_a_list_of_named_templates_uses_default(tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    tokenizer = make_tokenizer(tmp_path / "t", CHATML_TOKENS, {"chat_template": templates})
    assert get_template("tokenizer", tokenizer).jinja_source == CHATML
    make_tokenizer(tmp_path / "t", CHATML_TOKENS, {"chat_template": templates[:1]})
    with pytest.raises(DataError, match="has no `default` template"):
        get_template("tokenizer", Tokenizer.load(tmp_path / "t"))


def write_template(tmp_path: Path, text: str) -> str:
    path = tmp_path / "template.jinja"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(call) -> str:
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_templates_give_one_line_errors(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "bare", CHATML_TOKENS)
    assert "has no chat template (no chat_template.jinja" in error_of(lambda: get_template("tokenizer", tokenizer))
    assert "chat template file not found" in error_of(lambda: get_template(str(tmp_path / "x.jinja"), tokenizer))

    broken = write_template(tmp_path, "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    assert error_of(lambda: get_template(broken, tokenizer)).startswith(f"{broken}:2: invalid Jinja chat template")

    make_tokenizer(tmp_path / "cfg", CHATML_TOKENS, {"chat_template": "{% if %}"})
    assert "tokenizer_config.json (`chat_template`), template line 1: invalid Jinja" in error_of(
        lambda: get_template("tokenizer", Tokenizer.load(tmp_path / "cfg")))

    make_tokenizer(tmp_path / "eos", CHATML_TOKENS, {"eos_token": "</s>", "chat_template": CHATML})
    assert "names eos_token '</s>'" in error_of(lambda: get_template("tokenizer", Tokenizer.load(tmp_path / "eos")))


def test_template_errors_name_the_template_and_the_conversation(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "t", CHATML_TOKENS)
    strict = get_template(write_template(tmp_path, (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
        "{% endif %}" + CHATML)), tokenizer)
    message = error_of(lambda: render(CONVERSATION, strict, tokenizer))
    assert "template.jinja refused the conversation starting 'Hi': Conversations must start with a user turn" in message

    escape = get_template(write_template(tmp_path, "{{ messages.__class__.__mro__ }}"), tokenizer)
    assert "SecurityError" in error_of(lambda: render(CONVERSATION, escape, tokenizer))
    namespace = get_template(write_template(tmp_path, "{% set ns = namespace(_x=1) %}" + CHATML), tokenizer)
    assert "SecurityError" in error_of(lambda: render(CONVERSATION, namespace, tokenizer))


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """Like templates that keep only the last turn's reasoning: the prefix renders disagree with the whole."""
    tokenizer = make_tokenizer(tmp_path / "t", CHATML_TOKENS)
    source = ("{% for m in messages %}{% set c = m.content %}{% if m.role == 'assistant' and not loop.last %}"
              "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m.role + '\\n' + c + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = get_template(write_template(tmp_path, source), tokenizer)
    thinking = [CONVERSATION[1], {"role": "assistant", "content": "<think>a</think>Yo"}, *CONVERSATION[3:]]
    assert "renders the conversation starting 'Hi' inconsistently" in error_of(
        lambda: render(thinking, template, tokenizer))
    assert trained_runs(*render(CONVERSATION[1:], template, tokenizer), tokenizer) == \
        ["Yo<|im_end|>\n", "Ok<|im_end|>\n"]  # without reasoning the same template is consistent


def test_config_accepts_jinja_templates_and_names_a_mistyped_one():
    data = {"train_path": "x.jsonl", "tokenizer": str(TOKENIZER)}
    for value in ("tokenizer", "chat_template.jinja", "model/tokenizer_config.json", "chatml"):
        assert build_config({"data": {**data, "chat_template": value}}).data.chat_template == value
    with pytest.raises(ConfigError, match=r"got 'chatm' \(did you mean `chatml`\?\)"):
        build_config({"data": {**data, "chat_template": "chatm"}})
    with pytest.raises(ConfigError, match="or a path to a .jinja file"):
        build_config({"data": {**data, "chat_template": "llama3"}})


def test_distill_teacher_template_compares_by_text_wherever_it_lies(tmp_path):
    from types import SimpleNamespace

    from polytrain.objectives.distill import check_same_tokenizer

    student = released("deepseek_v3", tmp_path / "student")
    teacher = released("deepseek_v3", tmp_path / "teacher")
    teacher_cfg = SimpleNamespace(data=SimpleNamespace(tokenizer=teacher.path, chat_template="tokenizer"))
    check_same_tokenizer(student, get_template("tokenizer", student), "tokenizer", teacher_cfg, "t")
    with pytest.raises(ConfigError, match="render differently"):
        check_same_tokenizer(student, get_template("deepseek", student), "deepseek", teacher_cfg, "t")


@pytest.mark.parametrize("name", ["polytrain", "chatml", "deepseek"])
def test_builtin_templates_have_an_equivalent_jinja_source(tmp_path, name):
    if name == "polytrain":
        tokenizer = make_tokenizer(tmp_path / "t", ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                                   {})
    else:
        tokenizer = chatml(tmp_path) if name == "chatml" else released("deepseek_v3", tmp_path)
    builtin = get_template(name, tokenizer)
    config = Path(tokenizer.path).parent / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": builtin.jinja_source}))
    jinja = get_template("tokenizer", tokenizer)
    for generation, messages in ((False, CONVERSATION), (True, CONVERSATION[:4])):
        assert render(messages, jinja, tokenizer, add_generation_prompt=generation) == render(
            messages, builtin, tokenizer, add_generation_prompt=generation)
        assert jinja.text(messages, generation) == hf_render(tokenizer, messages, tokenize=False,
                                                             add_generation_prompt=generation)
    assert set(jinja.stop) <= set(builtin.stop)
