"""config.json of a released checkpoint <-> ModelConfig: the keys every family shares, the rotary scaling (the
release's `rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters`), and a dispatch by `model_type` to
the family's own keys (`ModelSpec.hf`). Export writes the release format, which
transformers also loads.
"""

from __future__ import annotations

from typing import Any

from polytrain.errors import ConfigError
from polytrain.models.common.config import ModelConfig
from polytrain.schema import from_dict

COMMON = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "scoring_func", "norm_topk_prob",
    "routed_scaling_factor", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "num_nextn_predict_layers",
    "qk_rope_head_dim",
)


def yarn_fields(source: dict[str, Any]) -> dict[str, Any]:
    return dict(
        rope_scaling="yarn",
        yarn_factor=float(source["factor"]),
        yarn_original_max_position_embeddings=int(source["original_max_position_embeddings"]),
        yarn_beta_fast=float(source.get("beta_fast") or 32),
        yarn_beta_slow=float(source.get("beta_slow") or 1),
        yarn_mscale=float(source.get("mscale") or 0),
        yarn_mscale_all_dim=float(source.get("mscale_all_dim") or 0),
        yarn_attention_factor=float(source.get("attention_factor") or 0),
    )


def rope_fields(source: dict[str, Any], where: str) -> dict[str, Any]:
    """Rotary fields from the release format (rope_theta + rope_scaling) or transformers 5's flat rope_parameters."""
    params = dict(source.get("rope_parameters") or {})
    scaling = dict(source.get("rope_scaling") or {})
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", source.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "yarn":
        out.update(yarn_fields(params if params.get("rope_type") == "yarn" else scaling))
    elif kind != "default":
        raise ConfigError(f"{where}: rope scaling type `{kind}` is not supported (only yarn)")
    return out


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json, in the family its `model_type` names (ConfigError naming
    what is unsupported)."""
    from polytrain.models.registry import families, spec_for_architecture

    model_type = hf.get("model_type")
    if model_type not in families():
        archs = ", ".join(hf.get("architectures") or []) or "none listed"
        raise ConfigError(
            f"{where}: model_type `{model_type}` (architectures: {archs}) is not supported; "
            f"supported: {', '.join(families())}"
        )
    spec = spec_for_architecture(model_type)
    values: dict[str, Any] = {key: hf[key] for key in COMMON + spec.hf.keys if hf.get(key) is not None}
    values["q_lora_rank"] = hf.get("q_lora_rank") or 0
    values["n_shared_experts"] = hf.get("n_shared_experts") or 0
    values["architecture"] = model_type
    try:
        spec.hf.read_config(hf, values, where)
        values["preset"] = f"hf:{model_type}"
        return from_dict(spec.config_class, values, "model")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def hf_config_from_model(config: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A config.json in the release format that `transformers` loads as the same architecture."""
    from polytrain.models.registry import spec_for

    spec = spec_for(config)
    out: dict[str, Any] = {
        "architectures": [spec.hf.hf_class],
        "model_type": config.architecture,
        **{key: getattr(config, key) for key in COMMON + spec.hf.keys},
        "q_lora_rank": config.q_lora_rank or None,
        "n_shared_experts": config.n_shared_experts,
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "rope_theta": config.rope_theta,
    }
    if config.rope_scaling == "yarn":
        scaling: dict[str, Any] = {
            "type": "yarn",
            "factor": config.yarn_factor,
            "original_max_position_embeddings": config.yarn_original_max_position_embeddings,
            "beta_fast": config.yarn_beta_fast,
            "beta_slow": config.yarn_beta_slow,
        }
        for key in ("mscale", "mscale_all_dim"):
            if getattr(config, f"yarn_{key}"):
                scaling[key] = getattr(config, f"yarn_{key}")
        out["rope_scaling"] = scaling
    spec.hf.write_config(config, out)
    return out
