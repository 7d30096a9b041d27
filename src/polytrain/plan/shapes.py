"""Where a model's parameters live, layer by layer: what pipeline stages and expert parallelism split.

Counted on the meta device with the models package's own component names (models/params.py), so the planner and
`polytrain model info` can never disagree about sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from polytrain.models.common.config import ModelConfig
from polytrain.models.params import components
from polytrain.models.registry import build_model, model_config_from_table
from polytrain.parallel.pp import split_layers


@dataclass(frozen=True)
class ModelShape:
    layer_dense: tuple[int, ...]
    """Per decoder layer: parameters every expert-parallel rank holds (attention, dense MLP, shared experts,
    router, norms, hyper-connections)."""
    layer_experts: tuple[int, ...]
    """Per decoder layer: routed-expert parameters (split over expert-parallel ranks)."""
    embedding: int
    head: int
    """Output head plus the final norm / hyper head."""
    mtp_dense: int
    mtp_experts: int

    @property
    def total(self) -> int:
        return (sum(self.layer_dense) + sum(self.layer_experts) + self.embedding + self.head + self.mtp_dense
                + self.mtp_experts)

    def stage_layers(self, pp: int) -> list[range]:
        """Decoder layers of each pipeline stage: the engine's even split (earlier stages take the remainder)."""
        return split_layers(len(self.layer_dense), pp)

    def stage_params(self, pp: int, stage: int) -> tuple[int, int]:
        """(dense, expert) parameters of pipeline stage `stage` of `pp`: the first stage holds the embedding, the
        last the head, final norm and MTP modules (as polytrain's pipeline places them)."""
        layers = self.stage_layers(pp)[stage]
        dense = sum(self.layer_dense[i] for i in layers)
        experts = sum(self.layer_experts[i] for i in layers)
        if stage == 0:
            dense += self.embedding
        if stage == pp - 1:
            dense += self.head + self.mtp_dense
            experts += self.mtp_experts
        return dense, experts


def _key(config: ModelConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


@lru_cache(maxsize=16)
def _shape(key: str) -> ModelShape:
    config = model_config_from_table(json.loads(key))
    model = build_model(config, "meta")
    component_of = components(model)
    layers = config.num_hidden_layers
    dense, experts = [0] * layers, [0] * layers
    embedding = head = mtp_dense = mtp_experts = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        routed = component_of[name] == "routed_experts"
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            (experts if routed else dense)[i] += n
        elif name.startswith("mtp."):
            if routed:
                mtp_experts += n
            else:
                mtp_dense += n
        elif name.startswith("embed_tokens"):
            embedding += n
        else:
            head += n
    return ModelShape(tuple(dense), tuple(experts), embedding, head, mtp_dense, mtp_experts)


def model_shape(config: ModelConfig) -> ModelShape:
    return _shape(_key(config))
