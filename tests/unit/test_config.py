"""Job config: TOML + --set overrides, errors that name the key and suggest the closest valid one."""

from __future__ import annotations

import pytest

from polytrain.config import build_config, config_to_toml, load_config, parse_override
from polytrain.errors import ConfigError
from polytrain.models import PRESETS, preset
from polytrain.schema import to_dict

MINIMAL = {"data": {"train_path": "t.jsonl", "tokenizer": "tok.json"}}


def config_with(**sections):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data)


def test_defaults_and_preset_values():
    config = config_with()
    assert config.model.preset == "tiny"
    assert config.model.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert config.train.steps == 200


def test_model_fields_override_the_preset():
    config = config_with(model={"preset": "tiny", "num_hidden_layers": 2})
    assert config.model.num_hidden_layers == 2 and config.model.hidden_size == PRESETS["tiny"]["hidden_size"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"lrr": 1.0}}, "unknown config key `train.lrr` in [train] (did you mean `lr`?)"),
        ({"train": {"lerning_rate": 1.0}}, "unknown config key `train.lerning_rate` in [train] (did you mean `lr`?)"),
        ({"train": {"max_grad_norm": 1.0}}, "(did you mean `grad_clip`?)"),
        ({"trian": {"lr": 1.0}}, "unknown config key `trian` (did you mean `train`?)"),
        ({"train": {"steps": "many"}}, "`train.steps` must be an integer, got 'many'"),
        ({"train": {"steps": 1.5}}, "`train.steps` must be an integer"),
        ({"train": {"steps": 0}}, "`train.steps` must be >= 1, got 0"),
        ({"train": {"min_lr_ratio": 2.0}}, "`train.min_lr_ratio` must be <= 1"),
        ({"data": {"packing": "yes"}}, "`data.packing` must be true or false"),
        ({"data": {"loss_on": "assistants"}}, "did you mean `assistant`?"),
        ({"run": {"device": "gpu"}}, "`run.device` must be one of auto, cpu, cuda, npu, privateuse1"),
        ({"model": {"preset": "tinny"}}, "unknown model preset `tinny` (did you mean `tiny`?)"),
        ({"model": {"hiden_size": 8}}, "`model.hiden_size` in [model] (did you mean `hidden_size`?)"),
        ({"model": {"n_group": 3}}, "must be divisible by `model.n_group` (3)"),
        ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, "must be a multiple of"),
    ],
)
def test_bad_values_name_the_key(sections, message):
    with pytest.raises(ConfigError) as err:
        config_with(**sections)
    assert message in str(err.value)


def test_missing_required_key_and_section():
    with pytest.raises(ConfigError, match="set `data.tokenizer` \\(a tokenizer.json\\), or `init.hf_path`"):
        build_config({"data": {"train_path": "x"}})
    with pytest.raises(ConfigError, match="missing required config key `data.train_path`"):
        build_config({"data": {"tokenizer": "x"}})
    with pytest.raises(ConfigError, match=r"missing \[data\] section"):
        build_config({})


def test_overrides_parse_toml_values():
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("data.packing=false") == ("data.packing", False)
    assert parse_override("run.output_dir=runs/x") == ("run.output_dir", "runs/x")
    assert parse_override('run.output_dir="a b"') == ("run.output_dir", "a b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_load_config_file_with_overrides_and_errors(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[data]\ntrain_path = "t.jsonl"\ntokenizer = "tok.json"\n[train]\nsteps = 5\n')
    config = load_config(path, ["train.steps=7", "model.num_hidden_layers=2"])
    assert config.train.steps == 7 and config.model.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="unknown config key `train.stpes`"):
        load_config(path, ["train.stpes=7"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = config_with(train={"lr": 5e-4}, model={"num_hidden_layers": 3})
    path = tmp_path / "resolved.toml"
    path.write_text(config_to_toml(config))
    assert to_dict(load_config(path)) == to_dict(config)


def test_every_preset_is_valid_and_every_model_field_documented():
    for name in PRESETS:
        assert preset(name).preset == name
    from dataclasses import fields

    from polytrain.models.common.config import ModelConfig

    assert all(f.metadata.get("help") for f in fields(ModelConfig))
