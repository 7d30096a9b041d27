"""config.json of a released DeepSeek checkpoint <-> ModelConfig (V3 and V4 families).

Both the release format (`rope_scaling`, V4's `compress_ratios` / `num_hash_layers`) and what transformers 5
writes (`rope_parameters`, `layer_types` / `mlp_layer_types`) are read; export writes the release format, which
transformers also loads.
"""

from __future__ import annotations

from typing import Any

from polytrain.errors import ConfigError
from polytrain.models.config import ModelConfig
from polytrain.schema import from_dict

SUPPORTED = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM"}

COMMON = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "scoring_func", "norm_topk_prob",
    "routed_scaling_factor", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "num_nextn_predict_layers",
    "qk_rope_head_dim",
)
V3_ONLY = (
    "first_k_dense_replace", "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "attention_bias",
    "n_group", "topk_group", "aux_loss_alpha", "rope_interleave",
)
V4_ONLY = (
    "head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rope_theta", "index_n_heads", "index_head_dim",
    "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit", "num_hash_layers", "compress_ratios",
)
LAYER_TYPE_KEYS = {"sliding_attention": None, "compressed_sparse_attention": "csa",
                   "heavily_compressed_attention": "hca"}


def _yarn(source: dict[str, Any]) -> dict[str, Any]:
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


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Rope fields from the release format (rope_theta + rope_scaling) or transformers 5's rope_parameters
    (flat, or V4's nested {"main", "compress"})."""
    params = dict(hf.get("rope_parameters") or {})
    if isinstance(params.get("main"), dict):  # V4, transformers format
        main, compress = params["main"], params.get("compress") or {}
        out: dict[str, Any] = {"rope_theta": float(main.get("rope_theta", 10000.0))}
        if "rope_theta" in compress:
            out["compress_rope_theta"] = float(compress["rope_theta"])
        if compress.get("rope_type") == "yarn":
            out.update(_yarn(compress))
        return out
    scaling = dict(hf.get("rope_scaling") or {})
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "yarn":
        out.update(_yarn(params if params.get("rope_type") == "yarn" else scaling))
    elif kind != "default":
        raise ConfigError(f"{where}: rope scaling type `{kind}` is not supported (only yarn)")
    return out


def _v4_layout(hf: dict[str, Any], values: dict[str, Any]) -> None:
    """compress_ratios / num_hash_layers from the release keys or from transformers' layer_types."""
    rates = {"csa": 4, "hca": 128}
    for name, key in (("compressed_sparse_attention", "csa"), ("heavily_compressed_attention", "hca")):
        rates[key] = int((hf.get("compress_rates") or {}).get(name, rates[key]))
    values["compress_ratio_csa"] = rates["csa"]
    if "compress_ratios" not in values and hf.get("layer_types"):
        unknown = [t for t in hf["layer_types"] if t not in LAYER_TYPE_KEYS]
        if unknown:
            raise ConfigError(f"unknown V4 layer types {unknown}")
        ratios = [rates[LAYER_TYPE_KEYS[t]] if LAYER_TYPE_KEYS[t] else 0 for t in hf["layer_types"]]
        values["compress_ratios"] = ratios + [0] * int(hf.get("num_nextn_predict_layers") or 0)
    if "num_hash_layers" not in values:
        kinds = hf.get("mlp_layer_types") or []
        values["num_hash_layers"] = next((i for i, k in enumerate(kinds) if k != "hash_moe"), len(kinds))
    if "qk_rope_head_dim" not in values:
        values["qk_rope_head_dim"] = int(hf.get("head_dim", 512) * (hf.get("partial_rotary_factor") or 0.125))
    values.update(architecture="deepseek_v4", first_k_dense_replace=0, n_group=1, topk_group=1,
                  intermediate_size=values.get("moe_intermediate_size", 2048), scoring_func=hf.get("scoring_func",
                                                                                                   "sqrtsoftplus"))
    if values.get("rope_scaling") == "yarn":
        values["yarn_attention_factor"] = 1.0  # V4 does not rescale cos / sin (the reference omits YaRN's mscale)


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig for a Hugging Face DeepSeek config.json (raises ConfigError naming what is unsupported)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        archs = ", ".join(hf.get("architectures") or []) or "none listed"
        raise ConfigError(
            f"{where}: model_type `{model_type}` (architectures: {archs}) is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    is_v4 = model_type == "deepseek_v4"
    keys = COMMON + (V4_ONLY if is_v4 else V3_ONLY)
    values: dict[str, Any] = {key: hf[key] for key in keys if hf.get(key) is not None}
    values["q_lora_rank"] = hf.get("q_lora_rank") or 0
    values["n_shared_experts"] = hf.get("n_shared_experts") or 0
    if not is_v4:
        heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads", hf.get("num_attention_heads"))
        if kv_heads != heads:
            raise ConfigError(f"{where}: MLA needs num_key_value_heads == num_attention_heads ({kv_heads} != {heads})")
        if hf.get("topk_method") not in (None, "noaux_tc", "group_limited_greedy", "greedy"):
            raise ConfigError(f"{where}: topk_method `{hf['topk_method']}` is not supported")
        if hf.get("topk_method") == "greedy":
            values["n_group"], values["topk_group"] = 1, 1
    try:
        values.update(_rope(hf, where))
        if is_v4:
            if hf.get("num_key_value_heads", 1) != 1:
                raise ConfigError("DeepSeek-V4 attention has one shared key/value head (num_key_value_heads = 1)")
            _v4_layout(hf, values)
        values["preset"] = f"hf:{model_type}"
        return from_dict(ModelConfig, values, "model")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def hf_config_from_model(config: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A config.json in the release format that `transformers` loads as the same architecture."""
    model_type = config.architecture
    keys = COMMON + (V4_ONLY if config.is_v4 else V3_ONLY)
    out: dict[str, Any] = {
        "architectures": [SUPPORTED[model_type]],
        "model_type": model_type,
        **{key: getattr(config, key) for key in keys},
        "q_lora_rank": config.q_lora_rank or None,
        "n_shared_experts": config.n_shared_experts,
        "num_key_value_heads": 1 if config.is_v4 else config.num_attention_heads,
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "rope_theta": config.rope_theta,
    }
    if config.is_v4:
        # the release's per-layer list, plus transformers' own keys (its legacy reader knows only ratios 4 and 128)
        ratios = list(config.compress_ratios)
        hca = next((r for r in ratios if r and r != config.compress_ratio_csa), 128)
        out["compress_ratios"] = ratios
        out["compress_rates"] = {"compressed_sparse_attention": config.compress_ratio_csa,
                                 "heavily_compressed_attention": hca}
        out["layer_types"] = [
            "sliding_attention" if not r else
            "compressed_sparse_attention" if r == config.compress_ratio_csa else "heavily_compressed_attention"
            for r in ratios[: config.num_hidden_layers]
        ]
        out["mlp_layer_types"] = ["hash_moe" if i < config.num_hash_layers else "moe"
                                  for i in range(config.num_hidden_layers)]
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
        if config.yarn_attention_factor and not config.is_v4:
            scaling["attention_factor"] = config.yarn_attention_factor
        out["rope_scaling"] = scaling
    return out
