"""Hugging Face interop proved against transformers' own DeepSeek-V3 / V4 models (tiny random configs):
logits parity on plain and padded batches, exact export round trip, FP8 / FP4 shards made by the test."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from polytrain.models import build_model
from polytrain.models.hf import HFCheckpoint, convert_checkpoint, load_hf_weights, save_hf
from polytrain.models.hf.quant import quantize_fp8, quantize_mxfp4
from tests.integration.hf_fixtures import make_hf_v3, make_hf_v4

pytest.importorskip("transformers")
TOL = 1e-4


def ours_from(path, mtp: int = 0):
    checkpoint = HFCheckpoint(path)
    model = build_model(replace(checkpoint.model_config, num_nextn_predict_layers=mtp), "cpu")
    load_hf_weights(model, checkpoint)
    return model.eval()


def batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, n), generator=generator) for n in (7, 33, 64)]


@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_v3_logits_match_transformers(tmp_path, yarn):
    hf = make_hf_v3(tmp_path / "hf", yarn=yarn)
    ours = ours_from(tmp_path / "hf")
    assert ours.config.rope_scaling == ("yarn" if yarn else "none")
    with torch.no_grad():
        for tokens in batches():
            diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
            assert diff <= TOL, diff


def test_v3_padded_batches_match_on_real_tokens(tmp_path):
    hf = make_hf_v3(tmp_path / "hf", yarn=True)
    ours = ours_from(tmp_path / "hf")
    tokens = torch.randint(0, 128, (3, 20))
    lengths = torch.tensor([20, 13, 6])
    real = torch.arange(20)[None, :] < lengths[:, None]
    for side in ("right", "left"):
        mask = real if side == "right" else real.flip(1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        doc_ids = torch.where(mask, 0, -1)
        with torch.no_grad():
            expected = hf(tokens, attention_mask=mask.long(), position_ids=positions).logits
            got = ours(tokens, position_ids=positions, doc_ids=doc_ids)
        assert (expected - got)[mask].abs().max().item() <= TOL, side


def test_v4_logits_match_transformers_including_right_padding(tmp_path):
    hf = make_hf_v4(tmp_path / "hf")
    ours = ours_from(tmp_path / "hf")
    assert ours.config.compress_ratios[:4] == [0, 4, 8, 4] and ours.config.num_hash_layers == 1
    with torch.no_grad():
        for tokens in batches(1):
            assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= TOL
        tokens = torch.randint(0, 128, (2, 40))
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, 25:] = 0
        expected = hf(tokens, attention_mask=mask).logits
        diff = (expected - ours(tokens))[mask.bool()].abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("family", ["v3", "v4"])
def test_export_round_trip_is_exact_and_transformers_loads_it(tmp_path, family):
    from transformers import AutoModelForCausalLM

    make = make_hf_v3 if family == "v3" else make_hf_v4
    make(tmp_path / "hf")
    ours = ours_from(tmp_path / "hf")
    save_hf(ours, tmp_path / "out", dtype=torch.float32, max_shard_bytes=200_000)
    files = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) > 1  # really sharded
    again = ours_from(tmp_path / "out")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() <= TOL


def test_v3_with_mtp_round_trips_through_release_layout(tmp_path):
    from polytrain.models import preset

    model = build_model(preset("tiny-v3"), "cpu", seed=3)
    save_hf(model, tmp_path / "out", dtype=torch.float32)
    names = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_layer = f"model.layers.{model.config.num_hidden_layers}"
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.up_proj.weight"):
        assert f"{mtp_layer}.{suffix}" in names
    checkpoint = HFCheckpoint(tmp_path / "out")
    again = build_model(checkpoint.model_config, "cpu", seed=9)
    load_hf_weights(again, checkpoint)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- quantised shards
def e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to powers of two (representable in E8M0, as the V4 release stores them)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantise_checkpoint(src, dst, family: str) -> dict[str, torch.Tensor]:
    """Write `src` as two FP8 (V3: fp32 `_scale_inv`; V4: E8M0 `.scale`) shards, V4 experts in MXFP4.
    Returns the exactly dequantised value of every tensor (computed here, independently of polytrain)."""
    handle = safe_open(str(src / "model.safetensors"), "pt")
    names = sorted(handle.keys())
    out, expected = {}, {}
    for name in names:
        tensor = handle.get_tensor(name)
        quantise = tensor.ndim == 2 and name.endswith(".weight") and not any(
            key in name for key in ("embed", "lm_head", "head.weight", "gate.weight", "norm"))
        if not quantise or not tensor.is_floating_point():
            out[name], expected[name] = tensor, tensor
            continue
        if family == "v4" and ".experts." in name:
            packed, scale = quantize_mxfp4(tensor)
            out[name], out[name[: -len(".weight")] + ".scale"] = packed, scale
            lut = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
            codes = packed.view(torch.uint8)
            values = torch.stack([lut[(codes & 15).long()], lut[(codes >> 4).long()]], -1).flatten(-2)
            expected[name] = values * torch.kron(scale.float(), torch.ones(1, 32))
            continue
        weight, scale = quantize_fp8(tensor)
        if family == "v4":
            scale = e8m0(scale)
            weight = (tensor / torch.kron(scale, torch.ones(128, 128))[: tensor.shape[0], : tensor.shape[1]]
                      ).to(torch.float8_e4m3fn)
            out[name], out[name[: -len(".weight")] + ".scale"] = weight, scale.to(torch.float8_e8m0fnu)
        else:
            out[name], out[name + "_scale_inv"] = weight, scale
        expected[name] = weight.float() * torch.kron(scale.float(), torch.ones(128, 128))[
            : tensor.shape[0], : tensor.shape[1]]
    dst.mkdir()
    keys = sorted(out)
    half = {k: ("model-00001-of-00002.safetensors" if i < len(keys) // 2 else "model-00002-of-00002.safetensors")
            for i, k in enumerate(keys)}
    # a weight and its scale must share a shard in this test only for simplicity of the split: not required
    for file in set(half.values()):
        save_file({k: out[k].contiguous() for k in keys if half[k] == file}, str(dst / file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("family", ["v3", "v4"])
def test_quantised_shards_dequantise_exactly_and_keep_logits(tmp_path, family):
    make = make_hf_v3 if family == "v3" else make_hf_v4
    make(tmp_path / "hf")
    expected = quantise_checkpoint(tmp_path / "hf", tmp_path / "fp8", family)
    checkpoint = HFCheckpoint(tmp_path / "fp8")
    stored = set()
    for name, value in expected.items():
        got = checkpoint.read(name, value.dtype if not value.is_floating_point() else torch.float32)
        assert torch.equal(got, value.float() if value.is_floating_point() else value), name
        stored.add(checkpoint.raw(name).dtype)
    assert torch.float8_e4m3fn in stored and (family == "v3" or torch.int8 in stored)
    ours = ours_from(tmp_path / "fp8")
    # transformers, given the streamed fp32 conversion of the same shards, computes the same logits
    converted = tmp_path / "bf32"
    convert_checkpoint(tmp_path / "fp8", converted, torch.float32)
    from transformers import AutoModelForCausalLM

    dequantised = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert (dequantised(tokens).logits - ours(tokens)).abs().max().item() <= TOL
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert not any(n.endswith(("_scale_inv", ".scale")) for n in HFCheckpoint(converted).weight_map)


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_checkpoints_name_the_file_or_tensor(tmp_path):
    from polytrain.errors import CheckpointError, ConfigError

    make_hf_v3(tmp_path / "hf")
    quantise_checkpoint(tmp_path / "hf", tmp_path / "q", "v3")

    unsupported = tmp_path / "llama"
    shutil.copytree(tmp_path / "q", unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (unsupported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type `llama` .*LlamaForCausalLM.* not supported"):
        _ = HFCheckpoint(unsupported).model_config

    absent = tmp_path / "absent"
    shutil.copytree(tmp_path / "q", absent)
    (absent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are absent: model-00002-of-00002"):
        HFCheckpoint(absent)

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "q", truncated)
    shard = truncated / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: unreadable or truncated"):
        ours_from(truncated)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(truncated, tmp_path / "converted", torch.bfloat16)
    assert not (tmp_path / "converted").exists()  # nothing that looks like a valid output

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "hf", wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["kv_lora_rank"] = 24
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="kv_a_proj_with_mqa.weight` has shape \\(24, 64\\), the model expects"):
        ours_from(wrong)

    with pytest.raises(CheckpointError, match="no MTP weights: set model.num_nextn_predict_layers = 0"):
        ours_from(tmp_path / "hf", mtp=1)
