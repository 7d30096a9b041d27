"""Every registered model family works through its ModelSpec alone: presets build on the meta device at real size
and on the CPU at toy size, the generic DecoderLM methods agree with each other, config.json and tensor names
round-trip, and the planner's hooks give consistent figures."""

from __future__ import annotations

import pytest
import torch

from polytrain.errors import ConfigError
from polytrain.models import DecoderLM, preset, spec_for
from polytrain.models.hf.config import hf_config_from_model, model_config_from_hf
from polytrain.models.params import count_parameters
from polytrain.models.registry import PRESETS, families, model_config_from_table, spec_for_architecture
from polytrain.plan.flops import flops_per_token
from polytrain.plan.memory import layer_activation_bytes
from polytrain.schema import to_dict

TOY = [name for name in PRESETS if name.startswith("tiny")]


def test_every_family_has_presets_and_every_preset_its_family():
    assert families(), "no model family registered"
    for family in families():
        spec = spec_for_architecture(family)
        assert spec.presets, family
        for name in spec.presets:
            config = preset(name)
            assert config.architecture == family and isinstance(config, spec.config_class)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_the_meta_device_through_its_spec(name):
    config = preset(name)
    model = spec_for(config).build(config, "meta")
    assert isinstance(model, DecoderLM)
    assert all(p.device.type == "meta" for p in model.parameters())
    unique = {id(p): p.numel() for p in model.parameters()}
    counts = count_parameters(config)
    assert sum(unique.values()) == counts.main_total + counts.mtp_total


@pytest.mark.parametrize("name", TOY)
def test_toy_presets_train_forward_through_the_generic_methods(name):
    config = preset(name)
    model = spec_for(config).build(config, "cpu", seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    model.train()
    out = model.forward_train(ids)
    assert out.hidden.shape == (2, 24, config.hidden_size)
    assert len(out.mtp_hidden) == config.num_nextn_predict_layers
    assert (out.aux_loss is not None) == (config.aux_loss_alpha > 0)
    (out.hidden.sum() + sum(h.sum() for h in out.mtp_hidden)).backward()
    assert model.embed_tokens.weight.grad is not None
    for block in [*model.layers, *model.mtp]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(ids)
        hidden = model.hidden_states(ids)
        train_hidden = model.forward_train(ids).hidden
    assert logits.shape == (2, 24, config.vocab_size)
    torch.testing.assert_close(logits, model.lm_head(hidden))
    torch.testing.assert_close(hidden, train_hidden)
    assert model.state_shape(2, 24) == model.embed(ids).shape


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_round_trips_for_every_preset(name):
    config = preset(name)
    back = model_config_from_hf(hf_config_from_model(config))
    expected = {**to_dict(config), "preset": f"hf:{config.architecture}"}
    assert to_dict(back) == expected


@pytest.mark.parametrize("name", TOY)
def test_tensor_names_round_trip_for_every_toy_preset(name):
    config = preset(name)
    source = spec_for(config).build(config, "cpu", seed=0)
    names = spec_for(config).hf.names(config)
    released = {}
    for key, tensor in source.state_dict().items():
        for hf_name, piece in names.to_hf(key, tensor):
            assert hf_name not in released, f"two tensors map to {hf_name}"
            released[hf_name] = piece.clone()
    target = spec_for(config).build(config, "cpu", seed=1)
    with torch.no_grad():
        for key, dest in target.state_dict().items():
            names.load_into(key, dest, lambda hf, indices, shape: released[hf][torch.meshgrid(*indices, indexing="ij")])
    for key, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[key]), key


@pytest.mark.parametrize("name", list(PRESETS))
def test_planner_hooks_give_positive_consistent_figures(name):
    config = preset(name)
    planner = spec_for(config).planner
    flops = flops_per_token(config, 4096)
    assert flops.total > 0 and flops.attention_core > 0 and flops.vocab_head > 0
    assert flops_per_token(config, 4096, attention="dense").attention_core >= flops.attention_core
    assert planner.residual_width(config) >= config.hidden_size
    assert planner.kv_width(config) > 0
    assert layer_activation_bytes(config, 0, 4096, 2) > 0


def test_a_preset_and_a_contradicting_architecture_are_refused():
    other = next(f for f in families() if f != PRESETS["tiny"]["architecture"])
    with pytest.raises(ConfigError, match="contradicts preset `tiny`"):
        model_config_from_table({"preset": "tiny", "architecture": other})
    with pytest.raises(ConfigError, match="not a registered model family"):
        model_config_from_table({"preset": "custom", "architecture": "llama"})


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v4"])
def test_tied_embeddings_stay_one_tensor_off_the_meta_device(name):
    """Moving a model off the meta device gives plain parameters new objects: the tie is made again."""
    from polytrain.models import model_config_from_table

    config = model_config_from_table({"preset": name, "tie_word_embeddings": True})
    model = spec_for(config).build(config, "cpu", seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(1 for _ in model.parameters()) == len(dict(model.named_parameters()))
