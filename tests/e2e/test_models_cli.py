"""Model commands as a user runs them: `model info`, `convert`, `export` (of a language model and of a reward model,
loaded back by transformers), and `sft` starting from a Hugging Face checkpoint or on the tiny DeepSeek-V4 preset
(generating through its KV cache)."""

from __future__ import annotations

import json

import pytest
import torch

from polytrain.data.chat import get_template, render
from polytrain.data.tokenizer import Tokenizer
from tests.conftest import EXAMPLES, TOKENIZER
from tests.e2e.test_cli import polytrain


def test_model_info_for_presets_and_config_json(tmp_path):
    out = polytrain("model", "info", "deepseek-v4-pro").stdout
    assert "published: 1,600.00B total, 49.00B activated" in out and "hyper_connections" in out
    info = json.loads(polytrain("model", "info", "deepseek-v3-671b", "--json").stdout)
    assert abs(info["published"]["total_deviation"]) < 0.02
    from polytrain.models import preset
    from polytrain.models.hf.config import hf_config_from_model

    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(preset("deepseek-v4-flash"))))
    from_file = json.loads(polytrain("model", "info", str(tmp_path / "config.json"), "--json").stdout)
    assert from_file["main_total"] == json.loads(polytrain("model", "info", "deepseek-v4-flash", "--json").stdout)[
        "main_total"]
    bad = polytrain("model", "info", "deepseek-v9", check=False)
    assert bad.returncode == 2 and "neither a preset" in bad.stderr


def job_on(tmp_path, model_lines: str, extra: str = "") -> str:
    lines = (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "job.toml"
    config.write_text(f"""
[run]
output_dir = "{tmp_path / 'run'}"
{model_lines}
[data]
train_path = "train.jsonl"
tokenizer = "{TOKENIZER}"
max_seq_len = 64
{extra}
[train]
steps = 3
global_batch_size = 4
micro_batch_size = 2
[checkpoint]
every = 0
""")
    return str(config)


def test_sft_starts_from_a_hugging_face_checkpoint_then_exports_and_converts(tmp_path):
    pytest.importorskip("transformers")
    from tests.integration.hf_fixtures import make_hf_v3

    make_hf_v3(tmp_path / "hf", yarn=True)
    config = job_on(tmp_path, f'[init]\nhf_path = "{tmp_path / "hf"}"\n[model]\nnum_nextn_predict_layers = 0')
    result = polytrain("sft", config)
    assert "loaded" in result.stderr and "tensors from" in result.stderr
    resolved = (tmp_path / "run" / "config.toml").read_text()
    assert 'preset = "hf:deepseek_v3"' in resolved and 'rope_scaling = "yarn"' in resolved

    exported = polytrain("export", str(tmp_path / "run"), str(tmp_path / "export"), "--dtype", "fp32")
    assert json.loads(exported.stdout)["step"] == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ours = Tokenizer.load(TOKENIZER)
    template = get_template("polytrain", ours)
    prompt = [{"role": "user", "content": "Say twice: abc"}]
    hf = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) == render(
        prompt, template, ours, add_generation_prompt=True)[0]
    stops = GenerationConfig.from_pretrained(tmp_path / "export").eos_token_id
    assert stops == [ours.token_id("<|end|>"), ours.token_id("<|eos|>")]
    again = polytrain("export", str(tmp_path / "run"), str(tmp_path / "export"), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr

    converted = polytrain("convert", str(tmp_path / "export"), str(tmp_path / "bf16"))
    assert json.loads(converted.stdout)["shards"] == 1
    from safetensors import safe_open

    shard = next((tmp_path / "bf16").glob("*.safetensors"))
    handle = safe_open(str(shard), "pt")
    dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert torch.bfloat16 in dtypes


def test_reward_model_exports_as_sequence_classification_giving_polytrain_rewards(tmp_path):
    pytest.importorskip("transformers")
    from polytrain.config import config_to_toml, load_config, read_run_config
    from polytrain.errors import ConfigError
    from polytrain.models.reward import build_reward_model
    from polytrain.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint
    from polytrain.train.export import export_run

    pairs = (EXAMPLES / "data" / "pref_train.jsonl").read_text().splitlines()[:8]
    (tmp_path / "pref.jsonl").write_text("\n".join(pairs) + "\n")
    config = job_on(tmp_path, '[model]\npreset = "tiny-v3"\nnum_hidden_layers = 2')  # tiny-v3: with MTP
    polytrain("rm", config, "--set", f'data.train_path="{tmp_path / "pref.jsonl"}"')
    polytrain("export", str(tmp_path / "run"), str(tmp_path / "export"), "--dtype", "fp32")
    assert not (tmp_path / "export" / "generation_config.json").exists()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert type(model).__name__ == "DeepseekV3ForSequenceClassification" and model.config.num_labels == 1
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    conversations = [[{"role": "user", "content": "Say twice: abc"}, {"role": "assistant", "content": "abc abc"}],
                     [{"role": "user", "content": "Reverse: abcdef"}, {"role": "assistant", "content": "fedcb"}]]
    batch = AutoTokenizer.from_pretrained(tmp_path / "export").apply_chat_template(
        conversations, padding=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model.eval()(**batch).logits.squeeze(-1)

    run = read_run_config(tmp_path / "run")
    ours = build_reward_model(run.model, "cpu", seed=None)
    load_checkpoint(latest_checkpoint(checkpoint_root(tmp_path / "run")), ours)
    tokenizer = Tokenizer.load(TOKENIZER)
    rows = [render(c, get_template("polytrain", tokenizer), tokenizer)[0] for c in conversations]
    real = batch["attention_mask"].bool()
    assert [batch["input_ids"][i][real[i]].tolist() for i in range(2)] == rows and not real.all()  # one is padded
    with torch.no_grad():
        expected = ours.eval().reward(batch["input_ids"], None, real.sum(1) - 1, doc_ids=torch.where(real, 0, -1))
    assert (theirs - expected).abs().max().item() <= 1e-5, (theirs, expected)
    assert (expected[0] - expected[1]).abs() > 1e-4  # the head reads each row's own last token

    v4 = tmp_path / "v4"
    v4.mkdir()
    (v4 / "config.toml").write_text(config_to_toml(load_config(config, [
        'run.algorithm="rm"', 'model.preset="tiny-v4"', "data.packing=false"])))
    with pytest.raises(ConfigError, match="deepseek_v4 family, which transformers has no sequence-classification"):
        export_run(v4, tmp_path / "v4-export")


def test_tiny_v4_trains_and_generates_with_its_kv_cache(tmp_path):
    config = job_on(tmp_path, '[model]\npreset = "tiny-v4"', extra="packing = false")
    summary = json.loads(polytrain("sft", config).stdout)
    assert summary["steps"] == 3
    out = polytrain("generate", str(tmp_path / "run"), "--prompt", "Say twice: abc", "--max-new-tokens", "5",
                    "--json")
    assert json.loads(out.stdout)["step"] == 3
    packed = json.loads(polytrain("sft", job_on(tmp_path, '[model]\npreset = "tiny-v4"'), "--overwrite").stdout)
    assert packed["steps"] == 3  # documents packed per row: windows and compressed entries kept per document
