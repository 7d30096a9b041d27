"""`polytrain model info`: what a preset, config.json or checkpoint directory describes, and how big it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polytrain.errors import ConfigError, closest
from polytrain.models.common.config import ModelConfig
from polytrain.models.hf.config import model_config_from_hf
from polytrain.models.params import PUBLISHED, count_parameters
from polytrain.models.registry import PRESETS, preset


def resolve_model(spec: str) -> ModelConfig:
    """A preset name, a config.json, or a directory holding one."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return model_config_from_hf(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
    raise ConfigError(f"`{spec}` is neither a preset{closest(spec, PRESETS)} nor a config.json / model directory; "
                      f"presets: {', '.join(PRESETS)}")


def _b(count: float) -> str:
    return f"{count / 1e9:,.2f}B" if count >= 1e8 else f"{count / 1e6:,.3f}M"


def model_info(spec: str) -> dict[str, Any]:
    config = resolve_model(spec)
    counts = count_parameters(config)
    info: dict[str, Any] = {
        "model": spec,
        "architecture": config.architecture,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "routed_experts": config.n_routed_experts,
        "experts_per_token": config.num_experts_per_tok,
        "shared_experts": config.n_shared_experts,
        "mtp_modules": config.num_nextn_predict_layers,
        "total": counts.total,
        "activated": counts.active,
        "main_total": counts.main_total,
        "main_activated": counts.main_active,
        "activated_without_embedding_and_head": counts.main_active - counts.active["embedding"]
        - counts.active["output_head"],
        "mtp_total": counts.mtp_total,
        "mtp_activated": counts.mtp_active,
    }
    if config.preset in PUBLISHED:
        total, active, source = PUBLISHED[config.preset]
        info["published"] = {"total": total, "activated": active, "source": source,
                             "total_deviation": counts.main_total / total - 1,
                             "activated_deviation": counts.main_active / active - 1}
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"{info['model']}: {info['architecture']}, {info['layers']} layers, hidden {info['hidden_size']}, "
        f"{info['routed_experts']} routed experts (top {info['experts_per_token']}) + {info['shared_experts']} shared, "
        f"{info['mtp_modules']} MTP module(s)",
        "",
        f"  {'component':<20}{'total':>14}{'activated/token':>18}",
    ]
    for name, total in info["total"].items():
        if total:
            lines.append(f"  {name:<20}{_b(total):>14}{_b(info['activated'][name]):>18}")
    lines.append(f"  {'main model':<20}{_b(info['main_total']):>14}{_b(info['main_activated']):>18}")
    lines.append(f"  {'MTP modules':<20}{_b(info['mtp_total']):>14}{_b(info['mtp_activated']):>18}  "
                 "(embedding and head shared with the main model)")
    lines.append(f"  activated without embedding and output head: {_b(info['activated_without_embedding_and_head'])}")
    if "published" in info:
        pub = info["published"]
        lines += ["", f"  published: {_b(pub['total'])} total, {_b(pub['activated'])} activated ({pub['source']})",
                  f"  deviation: total {pub['total_deviation']:+.1%}, activated {pub['activated_deviation']:+.1%}"]
    return "\n".join(lines)
