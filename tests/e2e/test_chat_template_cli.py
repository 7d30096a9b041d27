"""`data.chat_template = "tokenizer"` end to end: SFT renders its data with the checkpoint's own (released DeepSeek-V3)
Jinja template, and the trained run answers prompts with it."""

from __future__ import annotations

import json
import shutil

from polytrain.data.jinja_template import JinjaTemplate
from polytrain.rollout.generate import SamplingConfig
from polytrain.train.chat import RunChat
from tests.conftest import EXAMPLES
from tests.e2e.test_cli import polytrain
from tests.unit.test_jinja_template import ASSETS, DEEPSEEK_TOKENS, make_tokenizer


def test_sft_with_the_tokenizers_own_template(tmp_path):
    make_tokenizer(tmp_path / "model", DEEPSEEK_TOKENS)
    shutil.copy(ASSETS / "deepseek_v3" / "tokenizer_config.json", tmp_path / "model" / "tokenizer_config.json")
    (tmp_path / "train.jsonl").write_text("".join(
        (EXAMPLES / "data" / "train.jsonl").read_text().splitlines(keepends=True)[:32]))
    (tmp_path / "job.toml").write_text(f"""
[run]
output_dir = "{tmp_path / 'run'}"
[model]
preset = "tiny"
num_hidden_layers = 1
[data]
train_path = "train.jsonl"
tokenizer = "model"
chat_template = "tokenizer"
max_seq_len = 64
[train]
steps = 2
global_batch_size = 4
micro_batch_size = 4
warmup_steps = 1
""")
    polytrain("sft", str(tmp_path / "job.toml"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_seen"] > 0
    chat = RunChat(tmp_path / "run", device="cpu")
    assert isinstance(chat.template, JinjaTemplate) and chat.template.stop == ("<｜end▁of▁sentence｜>",)
    answers = chat.answer(["Say twice: abc"], SamplingConfig(max_new_tokens=4))
    assert len(answers) == 1 and isinstance(answers[0], str)
